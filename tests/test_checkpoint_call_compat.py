"""Gradient checkpointing as transformers < 5.23 does it: the layer's whole ``__call__`` (module hooks included)
inside the checkpoint, ``checkpoint(partial(super().__call__, **kwargs), *args)``.

The installed transformers (>= 5.23) checkpoints ``forward`` only, so the old behaviour is rebuilt here on the
tiny model's own layer class. Before the library kept its hooks outside such a checkpoint, the recompute in
the caller's backward re-ran them: stored mode raised KeyError, eager mode with LoRA failed checkpoint's
metadata check (the recompute saw the layer input the pre-hook had not swapped); both seen with transformers
5.17 on an H200 and on CPU.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lopt_kernels
from tiny_models import batch, tiny_model, with_old_checkpoint_call

pytestmark = pytest.mark.explicit_modes


def _model(*, checkpointing: str | None, lora: bool, old_style: bool):
    model = tiny_model("llama")
    if old_style:
        with_old_checkpoint_call(model.model.layers)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return model


def _grads(model, mode):
    lopt_kernels.patch(model, mode=mode)
    model.train()
    out = model(**batch())
    out.loss.backward()
    return float(out.loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["stored", "eager", "activation_free"])
def test_old_style_checkpointed_call_gives_the_gradients_of_no_checkpointing(mode, lora, checkpointing):
    loss, grads = _grads(_model(checkpointing=checkpointing, lora=lora, old_style=True), mode)
    ref_loss, ref_grads = _grads(_model(checkpointing=None, lora=lora, old_style=False), mode)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_layers_own_checkpoint_function_is_back_after_the_forward():
    model = _model(checkpointing="non_reentrant", lora=False, old_style=True)
    before = [layer._gradient_checkpointing_func for layer in model.model.layers]
    _grads(model, "eager")
    assert [layer._gradient_checkpointing_func for layer in model.model.layers] == before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["stored", "eager", "activation_free"])
def test_layers_wrapped_in_place_after_patch_train_as_unwrapped(mode, family):
    """torch's ``checkpoint_wrapper`` put around each layer in place after ``patch`` (what accelerate's and
    torchtitan's activation checkpointing under FSDP2 do). Before, our hooks stayed on the inner layers, inside the
    checkpoint: the recompute in the backward ran them again (stored raised StopIteration); under FSDP2 (which
    shards the wrapper) the activation-free rebuild also called the inner layer past the wrapper's unshard hooks
    (tests/integrations/test_distributed.py covers that through accelerate)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # noqa: PLC0415
        apply_activation_checkpointing, checkpoint_wrapper)

    def steps(wrap):
        torch.manual_seed(0)
        model = lopt_kernels.patch(tiny_model(family), mode=mode)
        model.config.use_cache = False  # a recompute would append to the KV cache again (as without LoPT)
        layers = model.model.layers if family == "llama" else model.transformer.h
        if wrap:
            layer_class = type(layers[0])
            apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                           check_fn=lambda m: isinstance(m, layer_class))
            assert type(layers[0]).__name__ == "CheckpointWrapper"
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for step in range(2):
            out = model(**batch(seed=step))
            out.loss.backward()
            losses.append(float(out.loss))
            optimizer.step()
            optimizer.zero_grad()
        return losses, {n.replace("._checkpoint_wrapped_module", ""): p.detach() for n, p in model.named_parameters()}

    losses, params = steps(wrap=True)
    ref_losses, ref_params = steps(wrap=False)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert params.keys() == ref_params.keys()
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-7, msg=name)
