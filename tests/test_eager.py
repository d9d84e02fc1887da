"""mode="eager": the bottom blocks learn during the forward. Same semantics as the other modes (the
equality tests of test_patch.py and the integrations run in eager mode too, see conftest.py); here what
is particular to it: compute, held gradients, refusals, and how "auto" resolves."""

import copy
import gc
import weakref

import pytest
import torch

import lopt_kernels
from lopt_kernels import patching
from lopt_kernels.boundary import common, eager
from reference import assert_grads_close
from tiny_models import FAMILIES, batch, tiny_model

pytestmark = pytest.mark.explicit_modes


def _pair(family, k, **config):
    model = tiny_model(family, **config)
    stored = copy.deepcopy(model)
    lopt_kernels.patch(model, num_blocks=k, mode="eager")
    lopt_kernels.patch(stored, num_blocks=k, mode="stored")
    stored.lopt_aux_decoders.load_state_dict(model.lopt_aux_decoders.state_dict())
    return model, stored


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_equals_stored(family, k):
    model, stored = _pair(family, k)
    b = batch(padding="left" if k == 3 else "right")
    out, ref = model(**b), stored(**b)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=0)
    assert_grads_close(_grads(model), _grads(stored), rtol=1e-5)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_eager_with_checkpointing_equals_stored_and_restores_the_checkpoint_function(checkpointing):
    model, stored = _pair("llama", 3)
    for m in (model, stored):
        m.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    funcs = [layer._gradient_checkpointing_func for layer in model.model.layers]
    b = batch()
    model(**b).loss.backward()
    stored(**b).loss.backward()
    assert_grads_close(_grads(model), _grads(stored), rtol=1e-5)
    # reentrant checkpointing refuses autograd.grad: eager checkpoints non-reentrantly for the forward only
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == funcs


def test_aux_decoder_runs_once_per_block_per_step(monkeypatch):
    calls = []
    original = common.reconstruction_loss_and_grads
    monkeypatch.setattr(common, "reconstruction_loss_and_grads",
                        lambda *a, **kw: calls.append(kw["compute_grads"]) or original(*a, **kw))
    model = lopt_kernels.patch(tiny_model("llama"), num_blocks=3, mode="eager")
    model(**batch()).loss.backward()
    assert calls == [True, True]  # loss and gradients from one pass of the fused op, per block


def test_second_backward_is_refused_with_a_clear_error():
    model = lopt_kernels.patch(tiny_model("llama"), mode="eager", fused_ce="off")
    out = model(**batch())
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*mode='activation_free' or mode='stored'"):
        out.loss.backward()


def test_held_gradients_are_freed_with_an_output_never_backpropagated(monkeypatch):
    held = []
    original = eager.run_local_backward

    def recording(*args):
        result = original(*args)
        held.extend(weakref.ref(g) for g in result[2] if g is not None)
        return result

    monkeypatch.setattr(eager, "run_local_backward", recording)
    model = lopt_kernels.patch(tiny_model("llama"), mode="eager")
    out = model(**batch())
    assert held and all(r() is not None for r in held)
    del out
    gc.collect()
    assert all(r() is None for r in held)


def test_nothing_eager_runs_in_eval_no_grad_or_generate(monkeypatch):
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, mode="eager")

    def refuse(*args):
        raise AssertionError("a local backward ran outside a training forward")

    monkeypatch.setattr(eager, "run_local_backward", refuse)
    b = batch()
    with torch.no_grad():  # train mode, no grad
        torch.testing.assert_close(model(**b).logits, original(**b).logits, rtol=0, atol=0)
    for m in (model, original):
        m.eval()
    torch.testing.assert_close(model(**b).logits, original(**b).logits, rtol=0, atol=0)
    prompt = b["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), original.generate(prompt, **kwargs))


def test_autograd_grad_returns_the_local_gradients():
    """The held gradients return through the boundary Function, so ``torch.autograd.grad`` sees them."""
    model, stored = _pair("llama", 2)
    b = batch()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(model(**b).loss, params, allow_unused=True)
    stored(**b).loss.backward()
    assert all(p.grad is None for p in params)
    names = [n for n, _ in model.named_parameters()]
    assert_grads_close(dict(zip(names, grads)), _grads(stored), rtol=1e-5)


def test_fp16_local_gradients_do_not_underflow():
    """The local backward runs on the gradient of the summed squared error (a power of two times the mean's),
    so activation gradients of order 1/N stay representable in fp16: closer to fp32 than fp16 stored mode,
    whose backward carries lambda/N-sized gradients (about 5% off here; 21% at eager's mean scale)."""
    model, stored = _pair("llama", 2)
    model.half()
    b = batch()
    model(**b).loss.float().backward()
    stored(**b).loss.backward()  # fp32
    g, ref = model.model.layers[0].mlp.down_proj.weight.grad, stored.model.layers[0].mlp.down_proj.weight.grad
    assert (g.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def _resolved_mode(model):
    return patching.require_state(model).current.mode


def test_auto_is_eager_for_lora_style_training_and_activation_free_for_full_fine_tuning():
    full = lopt_kernels.patch(tiny_model("llama"), mode="auto")
    full(**batch(seq=11)).loss.backward()
    assert _resolved_mode(full) == "activation_free"  # 5 tiny layers: parameters outweigh 2 x 11 tokens

    frozen = tiny_model("llama")
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.model.layers[0].mlp.down_proj.bias = None
    frozen.model.layers[0].input_layernorm.weight.requires_grad_(True)  # a few trainable bottom weights (LoRA-like)
    lopt_kernels.patch(frozen, mode="auto")
    frozen(**batch(seq=11)).loss.backward()
    assert _resolved_mode(frozen) == "eager"
    assert frozen.model.layers[0].input_layernorm.weight.grad.abs().max() > 0


def _held_input_gradients(monkeypatch):
    held = []
    original = eager.run_local_backward

    def recording(*args):
        result = original(*args)
        held.append(result[2][-1])
        return result

    monkeypatch.setattr(eager, "run_local_backward", recording)
    return held


def test_no_input_gradient_is_held_for_a_frozen_embedding_made_to_require_grad(monkeypatch):
    """Checkpointing (and PEFT) make the frozen embeddings' output require grad; eager mode holds neither a
    gradient for it nor the output itself (two activation-sized tensors) through the top half's work."""
    held = _held_input_gradients(monkeypatch)
    records = []
    original_hand_over = eager.hand_over
    monkeypatch.setattr(eager, "hand_over", lambda record: records.append(record) or original_hand_over(record))
    model, stored = _pair("llama", 2)
    for m in (model, stored):
        m.model.embed_tokens.weight.requires_grad_(False)
        m.gradient_checkpointing_enable({"use_reentrant": False})
    b = batch()
    out = model(**b)
    # the embedding output is not kept for the caller's backward either (it was, as the held block input)
    assert [r.x.numel() for r in records] == [0]
    out.loss.backward()
    stored(**b).loss.backward()
    assert held == [None]
    assert_grads_close(_grads(model), _grads(stored), rtol=1e-5)


def test_the_callers_inputs_embeds_leaf_gets_its_gradient(monkeypatch):
    held = _held_input_gradients(monkeypatch)
    model, stored = _pair("llama", 2)
    b = batch()
    grads = []
    for m in (model, stored):
        embeds = m.model.embed_tokens(b["input_ids"]).detach().requires_grad_(True)
        m(inputs_embeds=embeds, attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        grads.append(embeds.grad)
    assert held[0] is not None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_the_aux_head_counts_its_flops():
    """The fused op's FLOPs are counted (two projections forward, four more for the gradients), so compare's
    eager-vs-end-to-end FLOP ratio includes the aux head."""
    from lopt_kernels.measure import _FlopCounter

    y, x = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    decoder = lopt_kernels.AuxDecoder(40)
    counter = _FlopCounter()
    with counter:
        common.reconstruction_loss_and_grads(y, x, *decoder.decoder_parameters(), backend="torch")
    assert counter.total == 6 * 2 * 21 * 40 * 10


def test_held_gradients_are_handed_over_before_the_task_loss_backward():
    """The aux term's Function enters the graph after the fused task loss, so the caller's backward hands the
    held gradients over before the cross-entropy's backward allocates its working set (before: after it)."""
    model = lopt_kernels.patch(tiny_model("llama"), mode="eager")
    seen = []
    bottom = model.model.layers[0].mlp.down_proj.weight
    model.lm_head.weight.register_hook(lambda g: seen.append(bottom.grad is not None))
    model(**batch()).loss.backward()
    assert seen == [True]


def test_held_gradients_are_handed_over_before_the_top_half_backward():
    """The aux term's Function enters the graph when the backbone's forward ends, so the caller's backward
    runs it first: the held gradients are .grad before the top half's backward allocates its working set."""
    model = lopt_kernels.patch(tiny_model("llama"), mode="eager")
    seen = []
    bottom = model.model.layers[0].mlp.down_proj.weight
    model.model.layers[4].register_full_backward_pre_hook(lambda m, g: seen.append(bottom.grad is not None))
    model(**batch()).loss.backward()
    assert seen == [True]


def test_the_local_backward_frees_grad_y_once_the_block_has_used_it(monkeypatch):
    """grad_y (activation-sized) is let go as soon as the block's last node has used it, not held to the end of the
    block's local backward (cpu-1b, 2 x 4096, LoRA: lopt+ckpt's step peak 874.8 -> 858.8 MiB under --fake)."""
    refs, alive = [], []
    original = eager.local_loss_and_grads

    def recording(*args, **kwargs):
        aux, grads = original(*args, **kwargs)
        refs.append(weakref.ref(grads[0]))
        return aux, grads

    monkeypatch.setattr(eager, "local_loss_and_grads", recording)
    model = lopt_kernels.patch(tiny_model("llama"), mode="eager")
    model.model.layers[0].register_full_backward_pre_hook(lambda m, g: alive.append(refs[-1]() is not None))
    model(**batch()).loss.backward()
    assert alive == [False]


@pytest.mark.explicit_modes
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_decoder_gradients_do_not_overflow(backend):
    """fp16 model: the eager local backward scales the aux loss up for the activations' sake (fp16 gradients of a
    mean underflow); the decoder's gradients, which sum over every row, came back from the op with that scale and
    overflowed fp16 to inf for a channel with a steady residual (a large-magnitude channel of the block input).
    They now come back unscaled in fp32 before their cast, and the scale is at most 2^16 for fp16."""
    import types

    from lopt_kernels.aux_decoder import AuxDecoder
    from lopt_kernels.boundary.common import BoundarySpec
    from lopt_kernels.ops.reconstruction_loss import reconstruction_loss

    torch.manual_seed(0)
    rows, h = 2048, 64
    decoder = AuxDecoder(h, dtype=torch.float16)
    x = torch.randn(rows, h).half()
    x[:, 5] += 40.0  # one massive channel in the block input, as fp16 LLMs have
    y = (x.float() + 0.5 * torch.randn(rows, h)).half()
    spec = BoundarySpec(decoder=decoder, backend=backend, layerwise_rebuild=False,
                        replay_guard=types.SimpleNamespace(replaying=False))
    _, held = eager.apply_boundary(spec, eager.start_block(x, [], input_needs_grad=False), y)
    eager.hand_over(held).backward()
    assert held.internal_scale <= 2.0**16
    ref = copy.deepcopy(decoder).float()
    reconstruction_loss(y.float(), x.float(), *ref.decoder_parameters(), eps=ref.norm.eps, backend="torch").backward()
    for got, want in zip(decoder.decoder_parameters(), ref.decoder_parameters()):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=2e-3, atol=2e-3 * want.grad.abs().max().item())


def _zaya():
    """A tiny Zaya: its layers return their router states beside the hidden states, and the backbone hands them to
    the next layer's call."""
    import transformers as tf

    config = tf.ZayaConfig(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=64,
                           num_experts=4, moe_intermediate_size=24, router_hidden_size=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


@pytest.mark.parametrize("lambda_aux", [0.0, 10.0])
def test_state_a_layer_hands_to_the_next_block_crosses_the_boundary_with_its_gradient_stopped(lambda_aux):
    """What a non-final block's last layer returns besides its hidden states (ZAYA's router states, which the next
    layer reads) reaches the next block with its gradient stopped, as the hidden states do: with lambda_aux=0 no
    parameter of block 0 gets a gradient, and eager equals stored. Before, both were refused at the boundary;
    without that refusal stored mode let the task loss train block 0 through them (24 of layer 0's parameters) and
    eager's local backward had freed the graph the task loss then reached ('Trying to backward through the graph a
    second time'). (Inside a block, every mode: test_misuse_runtime.py.)"""
    base = _zaya()
    b = batch()
    grads = {}
    for mode in ("stored", "eager"):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same aux decoders in every mode
        lopt_kernels.patch(model, num_blocks=2, mode=mode, lambda_aux=lambda_aux)
        model(**b, use_cache=False).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if lambda_aux == 0.0:
            assert not [n for n, g in grads[mode].items() if ".layers.0." in n and g.abs().max() > 0], mode
        else:
            assert grads[mode]["model.layers.0.mlp.gate.router_mlp.fc1.weight"].abs().max() > 0, mode
    assert grads["eager"].keys() == grads["stored"].keys()
    for n, g in grads["stored"].items():
        torch.testing.assert_close(grads["eager"][n], g, rtol=1e-4, atol=1e-8, msg=n)
