"""patch() on a PEFT-wrapped model (LoRA adapters, frozen base)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lopt_kernels
from reference import assert_grads_close
from tiny_models import batch, tiny_model


def _lora(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    return get_peft_model(model, config)


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("order", ["patch_after_peft", "patch_before_peft"])
def test_lora_bottom_trained_by_local_loss_only(order):
    base = tiny_model("llama")
    if order == "patch_after_peft":
        model = lopt_kernels.patch(_lora(base))
    else:
        model = _lora(lopt_kernels.patch(base))
    assert lopt_kernels.is_patched(model)
    probe = model(**batch())
    grads = torch.autograd.grad(probe.task_loss, [p for n, p in model.named_parameters() if "layers.0." in n
                                                   and p.requires_grad], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    out = model(**batch())
    torch.testing.assert_close(out.loss, out.task_loss + 10.0 * out.aux_loss)
    out.loss.backward()
    lora = _lora_grads(model)
    assert all(g is not None and g.abs().max() > 0 for n, g in lora.items()), "every adapter gets a gradient"


def test_lora_activation_free_equals_stored_with_reentrant_checkpointing():
    base = tiny_model("llama")
    free = _lora(copy.deepcopy(base))
    stored = _lora(copy.deepcopy(base))
    stored.load_state_dict(free.state_dict())
    lopt_kernels.patch(free)
    lopt_kernels.patch(stored, mode="stored")
    lopt_kernels.aux_decoders(stored)[0].load_state_dict(lopt_kernels.aux_decoders(free)[0].state_dict())
    for m in (free, stored):
        m.gradient_checkpointing_enable({"use_reentrant": True})
        m.enable_input_require_grads()
    b = batch()
    free(**b).loss.backward()
    stored(**b).loss.backward()
    assert_grads_close(_lora_grads(free), _lora_grads(stored), rtol=1e-5)
    assert all(g is not None for g in _lora_grads(free).values())


@pytest.mark.explicit_modes
@pytest.mark.parametrize("num_blocks", [2, 3])
@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_prefix_tuning_trains_the_bottom_layers_prefix(mode, num_blocks):
    """PEFT prefix tuning: the bottom layers read a trainable key/value prefix from the KV cache. Eager mode (which
    ``auto`` picks for a frozen base) hands its aux-loss gradient over with the block's own, as ``mode="stored"``
    (all activations in one graph, the reference's way) gives it. Before, the bottom layers' prefix got no
    gradient at all: the local backward differentiated the block's parameters and input only."""
    from peft import PrefixTuningConfig

    base = tiny_model("llama")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    models = {}
    for name in (mode, "stored"):
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), config)
        torch.manual_seed(2)
        lopt_kernels.patch(model, mode=name, num_blocks=num_blocks)
        model.train()
        out = model(**batch(padding="left"))
        out.loss.backward()
        models[name] = (model, out)
    (model, out), (stored, stored_out) = models[mode], models["stored"]
    assert model.base_model._lopt_state.current.mode == "eager"
    torch.testing.assert_close(out.loss, stored_out.loss, rtol=1e-5, atol=1e-7)
    prefix = dict(model.named_parameters())["prompt_encoder.default.embedding.weight"].grad
    expected = dict(stored.named_parameters())["prompt_encoder.default.embedding.weight"].grad
    torch.testing.assert_close(prefix, expected, rtol=1e-4, atol=1e-9)
    # the first layer's key/value columns (aux gradient only) are not zero
    assert expected[:, : expected.shape[1] // len(lopt_kernels.aux_decoders(model)) // 4].abs().max() > 0


@pytest.mark.explicit_modes
@pytest.mark.parametrize("kind,group", [("prompt_tuning", "lopt_local"), ("prefix_tuning", "lopt_top")])
@pytest.mark.parametrize("order", ["patch_after_peft", "patch_before_peft"])
def test_param_groups_keep_the_prompt_encoder(kind, group, order):
    """``param_groups`` on a PEFT prompt-learning model: the prompt encoder lives outside the causal LM, and was left
    out of every group, so an optimiser built from the groups never trained the adapter. Virtual input tokens (prompt
    tuning) feed block 0 like the embeddings (local group); prefix tuning's key/value prefix is read by every layer
    (top group). No trainable parameter is left out."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    config = (PromptTuningConfig if kind == "prompt_tuning" else PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                                      num_virtual_tokens=3)
    base = tiny_model("llama")
    model = (lopt_kernels.patch(get_peft_model(base, config)) if order == "patch_after_peft"
             else get_peft_model(lopt_kernels.patch(base), config))
    groups = lopt_kernels.param_groups(model, lr=1e-3, local_lr=1e-4)
    grouped = {id(p): g["name"] for g in groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grouped) == {id(p) for p in trainable.values()}, "a trainable parameter is in no group"
    assert grouped[id(trainable["prompt_encoder.default.embedding.weight"])] == group


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_lora_on_a_tied_output_head_is_untied_at_patch(family):
    """A tied-embedding model whose lm_head carries LoRA: patch unties the head's base layer (the embedding learns
    in the bottom block, the head in the top). It raised KeyError("attribute 'weight' already exists"): PEFT's LoRA
    layer exposes its base layer's weight as a property, which cannot take a new parameter."""
    base = tiny_model(family)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    targets = ["q_proj", "lm_head"] if family == "gemma2" else ["c_attn", "lm_head"]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    before = model.get_input_embeddings().weight.detach().clone()
    lopt_kernels.patch(model)
    head = model.get_base_model().get_output_embeddings()
    assert head.get_base_layer().weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(head.get_base_layer().weight, before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="fused task loss is off"):
        out = model(**batch())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and "lm_head" in n)
