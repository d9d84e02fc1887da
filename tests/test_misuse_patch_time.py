"""Misuse that ``patch`` must refuse up front: each case raises
``LoptPatchError`` naming the problem and the fix, and leaves the model unpatched and working."""

import copy

import numpy as np
import pytest
import torch
import transformers as tf

import lopt_kernels
from lopt_kernels import LoptPatchError
from reference import ReferenceLoPT, assert_grads_close, named_grads
from tiny_models import FAMILIES, batch, tiny_model


def _still_works_unpatched(model):
    assert not lopt_kernels.is_patched(model)
    assert not hasattr(model, "lopt_aux_decoders")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.zero_grad(set_to_none=True)
    model(**batch(), use_cache=False).loss.backward()  # (no KV cache: it cannot take a repeated layer)
    assert model.get_input_embeddings().weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------- weight sharing
# 5 layers, default num_blocks=2: block 0 = layers 0-2, block 1 (the final block) = layers 3-4.


@pytest.mark.parametrize(
    "repeat, original, message",
    [
        (3, 1, r"(?s)layers 1 and 3 are the same module.*boundaries"),  # in two blocks
        # twice in a bottom block: hooks are per module object, so layer 0's block-start hook would fire as layer 1
        (1, 0, r"layers 0 and 1 are the same module"),
    ],
    ids=["in_two_blocks", "twice_in_a_bottom_block"],
)
def test_same_layer_module_refused(repeat, original, message):
    model = tiny_model("llama")
    model.model.layers[repeat] = model.model.layers[original]
    with pytest.raises(LoptPatchError, match=message):
        lopt_kernels.patch(model)
    _still_works_unpatched(model)


def test_same_layer_module_twice_in_the_final_block_accepted():
    model = tiny_model("llama")
    model.model.layers[4] = model.model.layers[3]  # both in the final block: ordinary autograd there
    lopt_kernels.patch(model)
    model(**batch(), use_cache=False).loss.backward()
    assert model.model.layers[3].mlp.down_proj.weight.grad.abs().max() > 0


def test_parameter_shared_across_blocks_refused():
    model = tiny_model("llama")
    layers = model.model.layers
    layers[4].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # block 0 and block 1 share a tensor
    with pytest.raises(LoptPatchError, match=r"(?s)layers 0 and 4 share.*mlp\.up_proj\.weight.*boundaries"):
        lopt_kernels.patch(model)
    _still_works_unpatched(model)


def test_parameter_shared_across_blocks_refused_for_explicit_boundaries():
    model = tiny_model("gpt2", num_hidden_layers=6)
    h = model.transformer.h
    h[3].attn.c_attn.weight = h[2].attn.c_attn.weight
    lopt_kernels.patch(model, boundaries=[2, 4])  # layers 2 and 3 in one block: fine
    lopt_kernels.unpatch(model)
    with pytest.raises(LoptPatchError, match=r"layers 2 and 3 share"):
        lopt_kernels.patch(model, boundaries=[3])
    _still_works_unpatched(model)


def test_input_embeddings_shared_with_a_later_block_refused():
    model = tiny_model("llama", intermediate_size=97)  # gate_proj (97 x 40) shaped like the embeddings
    # a (contrived) layer of the final block reusing the embedding matrix: trained by two losses
    model.model.layers[4].mlp.gate_proj.weight = model.get_input_embeddings().weight
    with pytest.raises(LoptPatchError, match=r"(?s)input embeddings.*layer 4"):
        lopt_kernels.patch(model)
    _still_works_unpatched(model)


def _gemma3n(num_layers, shared):
    config = tf.Gemma3nTextConfig(
        vocab_size=97, vocab_size_per_layer_input=97, hidden_size=32, hidden_size_per_layer_input=8, intermediate_size=64,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=64, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
        num_kv_shared_layers=shared, laurel_rank=4, altup_num_inputs=4, activation_sparsity_pattern=[0.0] * num_layers,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return tf.Gemma3nForCausalLM(config).train()


@pytest.mark.explicit_modes
def test_kv_shared_across_blocks_refused():
    """Gemma3n's last layers reuse the keys/values earlier layers computed (KV sharing). A boundary between such a
    pair let the task loss reach the earlier block through them in stored mode, gave the aux-only gradient in
    activation-free mode (about 50x smaller) and crashed eager mode; such boundaries are refused, naming the layers
    and the boundaries that keep the pairs together."""
    model = _gemma3n(6, 2)  # layers 4 and 5 reuse layers 2 and 3: the midpoint (3) separates layers 2 and 4
    with pytest.raises(LoptPatchError, match=r"layer 4 reuses the keys and values layer 2.*boundary at layer 3.*\[1, 2\]"):
        lopt_kernels.patch(model)
    assert not lopt_kernels.is_patched(model)
    lopt_kernels.patch(model, boundaries=[2], mode="stored")  # both pairs in the final block
    model(**batch(pad_lengths=(0,)), use_cache=False).loss.backward()
    with pytest.raises(LoptPatchError, match="this model cannot be split"):
        lopt_kernels.patch(_gemma3n(4, 2))  # layers 2 and 3 reuse layer 1: every boundary separates a pair


@pytest.mark.explicit_modes
def test_per_layer_inputs_are_trained_in_auto_and_refused_by_activation_free():
    """Gemma3n's layers also read per-layer inputs built from trainable embeddings outside the layer stack. The
    activation-free rebuild differentiated the block's input and parameters only, so their aux-loss gradient was
    silently left out (auto picked it for a full fine-tune). Now ``auto`` runs eager blocks, which hand that gradient
    over (equal to ``mode="stored"``), and an explicit ``mode="activation_free"`` is refused."""
    base = _gemma3n(4, 0)
    with torch.no_grad():  # nonzero, so that the per-layer inputs reach the output (0 at initialisation)
        for name, p in base.named_parameters():
            if "correct_output_scale" in name:
                p.normal_(0, 0.5)
    b = batch(pad_lengths=(0,))
    free = lopt_kernels.patch(copy.deepcopy(base), mode="activation_free")
    with pytest.raises(LoptPatchError, match="mode='activation_free' cannot train this model.*per_layer_inputs"):
        free(**b, use_cache=False)
    grads = {}
    for mode in ("auto", "stored"):
        model = copy.deepcopy(base)
        torch.manual_seed(3)
        lopt_kernels.patch(model, mode=mode)
        model(**b, use_cache=False).loss.backward()
        grads[mode] = named_grads(model)
        if mode == "auto":
            assert lopt_kernels.patching.state_of(model).current.mode == "eager"
    assert grads["stored"]["model.embed_tokens_per_layer.weight"].abs().max() > 0
    assert_grads_close(grads["auto"], grads["stored"])


@pytest.mark.explicit_modes
def test_frozen_per_layer_inputs_do_not_count_as_trainable():
    """Gemma3n with LoRA and ``enable_input_require_grads`` (gradient checkpointing turns it on): the per-layer
    inputs require grad only through the embedding output's placeholder, every parameter behind them is frozen, so
    ``mode="activation_free"`` must train the model, not refuse it as having trainable per-layer inputs."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_gemma3n(4, 0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.enable_input_require_grads()
    lopt_kernels.patch(model, mode="activation_free")
    model.train()
    model(**batch(pad_lengths=(0,)), use_cache=False).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and "layers.0." in n)


def test_kv_sharing_pairs_follow_explicit_source_layers():
    """A config naming each layer's key/value source (``kv_source_layers``, modes such as "reuse_but_indexer")
    gives the pairs it names, not pairs guessed from the layer types."""
    from types import SimpleNamespace

    from lopt_kernels.discovery import kv_sharing_pairs

    config = SimpleNamespace(kv_source_layers=[0, 1, 0, 1], layer_types=["full"] * 4,
                             kv_sharing_modes=[None, None, "reuse_but_indexer", "reuse_but_indexer"])
    assert kv_sharing_pairs(config, 4) == [(0, 2), (1, 3)]
    modes_only = SimpleNamespace(layer_types=["a", "b", "a", "b"], kv_sharing_modes=["store", "store", "reuse_x", "reuse"])
    assert kv_sharing_pairs(modes_only, 4) == [(0, 2), (1, 3)]


def test_parameter_shared_within_one_block_trains_like_the_reference():
    model = tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # both in block 0
    layers[4].self_attn.o_proj.weight = layers[3].self_attn.o_proj.weight  # both in the final block
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    ref = ReferenceLoPT(original, "llama", [0, 3, 5], lopt_kernels.aux_decoders(model))
    b = batch()
    out = model(**b)
    out.loss.backward()
    loss, _, _ = ref.step_loss(b)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
    assert_grads_close(named_grads(model), named_grads(ref.model))
    assert layers[0].mlp.up_proj.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------- not a causal LM


def _tiny_t5():
    config = tf.T5Config(vocab_size=97, d_model=40, d_kv=10, d_ff=72, num_layers=4, num_heads=4,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(config).train()


def _tiny_bert_mlm():
    config = tf.BertConfig(vocab_size=97, hidden_size=40, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=72, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    return tf.BertForMaskedLM(config).train()


def test_encoder_decoder_t5_refused():
    model = _tiny_t5()
    with pytest.raises(LoptPatchError, match=r"(?s)encoder-decoder.*decoder-only causal LM.*Supported"):
        lopt_kernels.patch(model)
    assert not lopt_kernels.is_patched(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    b = batch()
    model(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()  # still the plain T5


def test_masked_lm_bert_refused():
    model = _tiny_bert_mlm()
    with pytest.raises(LoptPatchError, match=r"(?s)BertForMaskedLM.*not a decoder-only causal LM.*Supported"):
        lopt_kernels.patch(model)
    assert not lopt_kernels.is_patched(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    b = batch()
    model(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_supported_family_still_patches(family):
    model = tiny_model(family)
    lopt_kernels.patch(model)
    assert lopt_kernels.is_patched(model)


def test_custom_and_peft_wrapped_causal_lms_still_patch():
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    class MyDecoder(tf.LlamaForCausalLM):  # a user's own subclass, in no transformers mapping
        pass

    torch.manual_seed(0)
    custom = MyDecoder(FAMILIES["llama"]())
    lopt_kernels.patch(custom)
    assert lopt_kernels.is_patched(custom)
    peft_model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj"]))
    lopt_kernels.patch(peft_model)
    assert lopt_kernels.is_patched(peft_model)


# ---------------------------------------------------------------------------- boundaries type


@pytest.mark.parametrize(
    "boundaries",
    ["13", "2", [1.7], [2.0], [True], [2, False], {2}, frozenset({1, 3}), {2: 1}, 2, [[2]], [None]],
    ids=repr,
)
def test_boundaries_not_a_list_of_ints_refused(boundaries):
    model = tiny_model("llama")
    with pytest.raises(LoptPatchError, match=r"boundaries must be a list or tuple of int layer indices"):
        lopt_kernels.patch(model, boundaries=boundaries)
    _still_works_unpatched(model)


@pytest.mark.parametrize("boundaries", [[2], (1, 3), [np.int64(2)], [torch.tensor(3)]], ids=repr)
def test_boundaries_int_sequences_accepted(boundaries):
    model = tiny_model("llama")
    lopt_kernels.patch(model, boundaries=boundaries)
    assert lopt_kernels.patching.state_of(model).settings.boundaries == tuple(int(b) for b in boundaries)
    assert all(type(b) is int for b in lopt_kernels.patching.state_of(model).settings.boundaries)


def test_parallel_lists_of_sublayers_refused():
    """XLM keeps each layer's attention, norms and feed-forward in parallel ModuleLists of num_hidden_layers modules
    (no module is a layer): the first by name (``transformer.attentions``) was hooked, so the boundary fell between an
    attention and its feed-forward, and the task loss trained the bottom half through the residual stream (every mode
    wrong, eager mode crashed with "backward through the graph a second time"). Now refused, naming the lists."""
    config = tf.XLMConfig(vocab_size=97, emb_dim=40, n_layers=4, n_heads=4, max_position_embeddings=64, dropout=0.0,
                          attention_dropout=0.0, pad_index=0, bos_index=1, eos_index=2, is_decoder=True, causal=True)
    torch.manual_seed(0)
    model = tf.XLMWithLMHeadModel(config).train()
    with pytest.raises(LoptPatchError, match=r"(?s)several nn.ModuleLists of 4 modules.*transformer.attentions.*"
                                             r"transformer.ffns.*not one module"):
        lopt_kernels.patch(model)
    assert not lopt_kernels.is_patched(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
