"""Liger kernels (Triton; on CPU under TRITON_INTERPRET=1, set in tests/conftest.py) before or after patch()
give the same losses and gradients as the patched model without Liger."""

import copy
import os

import pytest
import torch

import lopt_kernels
from tiny_models import batch, tiny_model

liger = pytest.importorskip("liger_kernel.transformers")


LIGER = {} if torch.cuda.is_available() else {"rms_norm": False, "swiglu": False}


@pytest.fixture
def restore_llama_module():
    """Liger swaps module-level functions/classes of modeling_llama; put them back for the other tests."""
    from transformers.models.llama import modeling_llama

    saved = {k: getattr(modeling_llama, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    forward = modeling_llama.LlamaForCausalLM.forward
    yield
    for k, v in saved.items():
        setattr(modeling_llama, k, v)
    modeling_llama.LlamaForCausalLM.forward = forward


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _step(model, b, n):
    model.zero_grad(set_to_none=True)
    out = model(**b, num_items_in_batch=n)
    out.loss.backward()
    return out, _grads(model)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["liger_then_patch", "patch_then_liger"])
def test_liger_composes_with_patch(order, restore_llama_module):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    base = tiny_model("llama")
    plain = lopt_kernels.patch(copy.deepcopy(base))
    fast = copy.deepcopy(base)
    if order == "liger_then_patch":
        liger._apply_liger_kernel_to_instance(model=fast, **LIGER)
        lopt_kernels.patch(fast)
    else:
        lopt_kernels.patch(fast)
        liger._apply_liger_kernel_to_instance(model=fast, **LIGER)
    lopt_kernels.aux_decoders(fast)[0].load_state_dict(lopt_kernels.aux_decoders(plain)[0].state_dict())
    assert "lce_forward" in fast.forward.__qualname__
    from transformers.models.llama import modeling_llama

    assert "liger" in modeling_llama.apply_rotary_pos_emb.__module__

    b = batch(seq=7, pad_lengths=(0, 2))
    n = torch.tensor(int((b["labels"][..., 1:] != -100).sum()) + 3)
    ref_out, ref_grads = _step(plain, b, n)
    out, grads = _step(fast, b, n)
    for key in ("loss", "task_loss", "aux_loss"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=1e-6, msg=key)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        scale = g.abs().max()
        assert (grads[name] - g).abs().max() <= 1e-4 * scale + 1e-7, name
    assert grads["model.layers.0.mlp.down_proj.weight"].abs().max() > 0

    fast.eval()
    plain.eval()
    with torch.no_grad():
        ids = b["input_ids"][:, :4]
        torch.testing.assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
