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
