import copy
import warnings

import pytest
import torch

import lopt_kernels
from reference import ReferenceLoPT, assert_grads_close, even_starts, layer_list, named_grads
from tiny_models import FAMILIES, batch, tiny_model

FAMILY_NAMES = list(FAMILIES)


def _patched_and_reference(family, k=2, **patch_kwargs):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, num_blocks=k, **patch_kwargs)
    starts = even_starts(len(layer_list(original, family)), k)
    ref = ReferenceLoPT(original, family, starts, lopt_kernels.aux_decoders(model),
                        lambda_aux=patch_kwargs.get("lambda_aux", 10.0))
    return model, ref


def _compare_step(model, ref, batches, num_items=None, divide=1):
    model.zero_grad(set_to_none=True)
    ref.zero_grad()
    for b in batches:
        out = model(**b, **({"num_items_in_batch": num_items} if num_items is not None else {}))
        (out.loss / divide).backward()
        loss, task, aux = ref.step_loss(b, num_items)
        (loss / divide).backward()
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out.task_loss, task, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out.aux_loss, aux, rtol=1e-4, atol=1e-8)
    assert_grads_close(named_grads(model), named_grads(ref.model))
    for dec, ref_dec in zip(lopt_kernels.aux_decoders(model), ref.decoders):
        assert_grads_close({n: p.grad for n, p in dec.named_parameters()},
                           {n: p.grad for n, p in ref_dec.named_parameters()})


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reference_parity(family, k, padding):
    model, ref = _patched_and_reference(family, k)
    b = batch(padding=padding)
    _compare_step(model, ref, [b])
    n = int((b["labels"][..., 1:] != -100).sum()) + 5  # as if the window held more micro-batches
    _compare_step(model, ref, [b], num_items=torch.tensor(n))


def test_positional_input_ids_keep_the_aux_share_of_num_items_in_batch():
    """``model(input_ids, attention_mask=..., labels=..., num_items_in_batch=n)``: the aux term still gets its share
    (counted labels / n). HF forwards take ``num_items_in_batch`` through ``**kwargs``, where binding the signature
    to positional arguments nests it; before, the aux term then got weight 1 (bottom-half gradients 2x here)."""
    model, ref = _patched_and_reference("llama")
    b = batch()
    n = torch.tensor(int((b["labels"][..., 1:] != -100).sum()) * 2)  # as if the window held two micro-batches
    rest = {k: v for k, v in b.items() if k != "input_ids"}
    out = model(b["input_ids"], **rest, num_items_in_batch=n)
    loss, task, aux = ref.step_loss(b, n)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
    out.loss.backward()
    loss.backward()
    assert_grads_close(named_grads(model), named_grads(ref.model))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_explicit_boundaries_and_odd_widths(family):
    model = tiny_model(family, num_hidden_layers=7)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, boundaries=[2, 3, 6])
    ref = ReferenceLoPT(original, family, [0, 2, 3, 6, 7], lopt_kernels.aux_decoders(model))
    _compare_step(model, ref, [batch()])


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_gradient_accumulation_matches_reference(family):
    model, ref = _patched_and_reference(family)
    micro = [batch(seed=1), batch(seed=2, pad_lengths=(1, 4))]
    # each micro-batch loss divided by the number of accumulation steps
    _compare_step(model, ref, micro, divide=2)
    # summed losses normalised by the label-token count of the whole window
    window = sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)
    _compare_step(model, ref, micro, num_items=torch.tensor(window))


def test_task_gradient_never_reaches_the_bottom_half():
    model = tiny_model("llama")
    lopt_kernels.patch(model, lambda_aux=0.0)
    model(**batch()).loss.backward()
    layers = model.model.layers
    for layer in layers[:3]:
        for p in layer.parameters():
            assert p.grad is None or p.grad.abs().max() == 0
    assert model.model.embed_tokens.weight.grad is None or model.model.embed_tokens.weight.grad.abs().max() == 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in layers[3].parameters())


def _assert_same_grads(a, b, rtol=1e-5):
    assert_grads_close({n: p.grad for n, p in a.named_parameters()}, {n: p.grad for n, p in b.named_parameters()},
                       rtol=rtol)


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_activation_free_equals_stored(family, checkpointing):
    free = tiny_model(family)
    stored = copy.deepcopy(free)
    lopt_kernels.patch(free, num_blocks=3, mode="activation_free")
    lopt_kernels.patch(stored, num_blocks=3, mode="stored")
    stored.lopt_aux_decoders.load_state_dict(free.lopt_aux_decoders.state_dict())
    if checkpointing:
        for m in (free, stored):
            m.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    b = batch()
    out_free, out_stored = free(**b), stored(**b)
    out_free.loss.backward()
    out_stored.loss.backward()
    torch.testing.assert_close(out_free.loss, out_stored.loss, rtol=1e-6, atol=0)
    _assert_same_grads(free, stored)


def test_checkpointing_matches_reference_with_lora_style_frozen_base():
    model, ref = _patched_and_reference("llama")
    model.gradient_checkpointing_enable({"use_reentrant": True})
    for m in (model, ref.model):
        m.model.embed_tokens.weight.requires_grad_(False)
    _compare_step(model, ref, [batch()])


def test_dropout_is_replayed_identically():
    model = tiny_model("gpt2", resid_pdrop=0.3, attn_pdrop=0.2)
    stored = copy.deepcopy(model)
    lopt_kernels.patch(model)
    lopt_kernels.patch(stored, mode="stored")
    stored.lopt_aux_decoders.load_state_dict(model.lopt_aux_decoders.state_dict())
    b = batch()
    torch.manual_seed(7)
    model(**b).loss.backward()
    torch.manual_seed(7)
    stored(**b).loss.backward()
    _assert_same_grads(model, stored)


def test_outputs_without_labels_and_in_eval():
    model = tiny_model("qwen3")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    b = batch()
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert out.loss is None and out.aux_loss is not None and out.aux_loss.requires_grad
    model.eval()
    original.eval()
    with torch.no_grad():
        patched_out, plain_out = model(**b), original(**b)
    assert "aux_loss" not in patched_out
    torch.testing.assert_close(patched_out.logits, plain_out.logits, rtol=0, atol=0)
    torch.testing.assert_close(patched_out.loss, plain_out.loss, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_forward_value_unchanged_in_training(family):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, fused_ce="off")  # keep the logits to compare them
    b = batch()
    out, plain = model(**b), original(**b)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.task_loss, plain.loss, rtol=0, atol=0)


def test_generate_is_unchanged():
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    for m in (model, original):
        m.eval()
    prompt = batch()["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), original.generate(prompt, **kwargs))


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_bottom_half_is_never_checkpointed_twice(reentrant, lopt_default_mode):
    """Counts MLP forwards per layer in one training step. Activation-free: the bottom half runs once without
    a graph, then (with checkpointing) once more to checkpoint layer inputs and once per layer with its graph.
    Eager: every layer runs as often as in end-to-end training (once, twice with checkpointing)."""
    model = tiny_model("llama")
    lopt_kernels.patch(model)
    if reentrant is not None:
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    calls = [0] * 5
    for i, layer in enumerate(model.model.layers):
        # a pre-hook: non-reentrant checkpointing may stop its recompute before an MLP forward returns
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    model(**batch()).loss.backward()
    if lopt_default_mode == "eager":
        assert calls == ([1] * 5 if reentrant is None else [2] * 5)
    elif reentrant is None:
        assert calls == [2, 2, 2, 1, 1]  # forward + one rebuild with graph; top half once
    else:
        assert calls == [3, 3, 3, 2, 2]  # + layer-input checkpoints; top half forward + recompute


def test_autocast_is_replayed_in_the_rebuild(lopt_default_mode):
    free = tiny_model("llama")
    stored = copy.deepcopy(free)
    lopt_kernels.patch(free)
    lopt_kernels.patch(stored, mode="stored")
    stored.lopt_aux_decoders.load_state_dict(free.lopt_aux_decoders.state_dict())
    b = batch()
    for m in (free, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**b)
        out.loss.backward()
    # The modes scale the local gradient at different points: activation-free by the caller's weight before
    # the bf16 backward (fp32 rounding ~1e-7, which bf16 matmuls turn into <= 2e-3 here; without the autocast
    # replay it is up to 1.3e-2); eager by a power of two before it and the caller's weight after it, so its
    # bf16 roundings differ from stored's by bf16 noise (<= 8e-3 here; no replay exists to get wrong).
    _assert_same_grads(free, stored, rtol=5e-3 if lopt_default_mode == "activation_free" else 1e-2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_gradients_into_grad_or_through_the_function_agree(monkeypatch, checkpointing):
    """Single process: the rebuild writes block gradients straight into .grad; under a process group they
    return through the boundary Function (one AccumulateGrad per parameter, as DDP requires)."""
    direct = tiny_model("llama")
    returned = copy.deepcopy(direct)
    for m in (direct, returned):
        lopt_kernels.patch(m)
        if checkpointing:
            m.gradient_checkpointing_enable({"use_reentrant": False})
    returned.lopt_aux_decoders.load_state_dict(direct.lopt_aux_decoders.state_dict())
    micro = [batch(seed=1), batch(seed=2)]
    for b in micro:  # two micro-batches: the second accumulates into existing .grad
        (direct(**b).loss / 2).backward()
    monkeypatch.setattr(lopt_kernels.block_hooks, "distributed", lambda: True)
    for b in micro:
        (returned(**b).loss / 2).backward()
    _assert_same_grads(direct, returned, rtol=1e-6)


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_loss_without_the_aux_term_warns_once(mode):
    """In every mode (issue 9 case 8: stored mode did not warn)."""
    model = tiny_model("llama")
    lopt_kernels.patch(model, mode=mode)
    with pytest.warns(UserWarning, match="does not contain the aux term"):
        model(**batch()).task_loss.backward()
    assert all(p.grad is None for p in model.model.layers[0].parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch()).task_loss.backward()  # once only
        model(**batch()).loss.backward()
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_grad_scaler_scales_and_unscales_the_local_gradient_too():
    model, ref = _patched_and_reference("llama")
    b = batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.scale(model(**b).loss).backward()
    scaler.unscale_(optimizer)  # divides every .grad by the scale, the bottom half's included
    loss, _, _ = ref.step_loss(b)
    loss.backward()
    assert_grads_close(named_grads(model), named_grads(ref.model))
    for dec, ref_dec in zip(lopt_kernels.aux_decoders(model), ref.decoders):
        assert_grads_close({n: p.grad for n, p in dec.named_parameters()},
                           {n: p.grad for n, p in ref_dec.named_parameters()})


@pytest.mark.explicit_modes
def test_the_text_decoder_is_chosen_over_a_tower_of_as_many_layers(monkeypatch):
    """A multimodal causal LM whose audio tower has as many layers as its text decoder (MossTranscribeDiarize, Gemma4):
    both lists match ``num_hidden_layers`` at the same depth, and the first by name (``model.audio_tower.layers``) was
    hooked, so the aux loss was the audio tower's (never run on text: no aux term at all) and the text decoder trained
    end to end. The list nearest the input embeddings (the text decoder's) is chosen."""
    import transformers as tf

    import reference

    config = tf.MossTranscribeDiarizeConfig(
        audio_config=dict(hidden_size=40, num_hidden_layers=4, num_attention_heads=4, intermediate_size=72),
        text_config=dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=10, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, mode="stored")
    assert lopt_kernels.patching.state_of(model).layers is model.model.language_model.layers
    monkeypatch.setitem(reference.LAYER_PATHS, "moss_transcribe_diarize", "model.language_model.layers")
    family_ref = ReferenceLoPT(original, "moss_transcribe_diarize", [0, 2, 4], lopt_kernels.aux_decoders(model))
    b = batch()
    out = model(**b)
    loss, task, aux = family_ref.step_loss(b)
    torch.testing.assert_close(out.lopt_aux_loss, aux, rtol=1e-4, atol=1e-8)
    out.loss.backward()
    loss.backward()
    assert_grads_close(named_grads(model), named_grads(family_ref.model))


def _tiny_jamba():
    import transformers as tf

    config = tf.JambaConfig(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts=4,
                            num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                            attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=1, mamba_dt_rank=8,
                            use_mamba_kernels=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_hybrid_stack_of_two_layer_classes_trains_like_the_reference(mode):
    """Jamba (and OlmoHybrid, Mllama) keep Mamba and attention layers, two classes, in one ModuleList of
    num_hidden_layers: patch refused them ("no nn.ModuleList of 4 identical decoder layers"). A list of mixed classes
    is now taken where no uniform one matches, and trains like the reference."""
    model = _tiny_jamba()
    assert len({type(layer) for layer in model.model.layers}) == 2
    _assert_trains_like_the_reference(model, "jamba", mode)


def _assert_trains_like_the_reference(model, family: str, mode: str, grad_rtol=None):
    """One patched step of a 4-layer ``model`` (2 blocks) against ReferenceLoPT on a copy: losses and gradients."""
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, mode=mode)
    ref = ReferenceLoPT(original, family, even_starts(4, 2), lopt_kernels.aux_decoders(model))
    b = batch()
    out = model(**b)
    loss, task, aux = ref.step_loss(b)
    torch.testing.assert_close(out.task_loss, task, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.lopt_aux_loss, aux, rtol=1e-4, atol=1e-8)  # (.aux_loss: a MoE's router loss)
    out.loss.backward()
    loss.backward()
    if grad_rtol is None:
        assert_grads_close(named_grads(model), named_grads(ref.model))
    else:
        assert_grads_close(named_grads(model), named_grads(ref.model), rtol=grad_rtol)


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_block_whose_output_dtype_differs_from_its_input_trains_like_the_reference(mode):
    """bf16 Mamba keeps its residual stream in fp32 (``residual_in_fp32``): block 0's input (the embeddings) is bf16,
    its output fp32. Every mode raised "y (torch.float32) and x (torch.bfloat16) must share one dtype"; the aux loss
    is computed in fp32 from both, as the reference does."""
    import transformers as tf

    config = tf.MambaConfig(vocab_size=97, hidden_size=40, num_hidden_layers=4, state_size=8, expand=1, conv_kernel=4,
                            time_step_rank=8, residual_in_fp32=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    _assert_trains_like_the_reference(model, "mamba", mode, grad_rtol=3e-2)


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_bottom_router_logits_are_cut_when_only_the_embeddings_train(mode):
    """Jamba has routers in some layers only, so its bottom router logits were found by their graph reaching a bottom
    layer's parameter. With the layers frozen (embedding-only tuning; PEFT prompt tuning likewise) no entry reached
    one: the router loss trained the embeddings through block 0 (stored: embedding grad off by 5%) or backpropagated
    into eager's freed block graph (RuntimeError). The embeddings' gradient must not depend on the router loss."""
    import transformers as tf

    grads = []
    for coef in (0.5, 0.0):
        config = tf.JambaConfig(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts=4,
                                num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                                attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=1, mamba_dt_rank=8,
                                use_mamba_kernels=False, output_router_logits=True, router_aux_loss_coef=coef,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
        for p in model.model.layers.parameters():
            p.requires_grad_(False)
        lopt_kernels.patch(model, mode=mode)
        torch.manual_seed(1)
        for dec in lopt_kernels.aux_decoders(model):
            dec.load_state_dict({k: torch.randn_like(v) * 0.1 + v for k, v in dec.state_dict().items()})
        model(**batch()).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)
