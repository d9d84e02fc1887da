"""Issue 9, "no silent wrong training": misuse and edge cases of the task loss and the output fields.

Each test is named after the case it guards; the patched model must do what the unpatched one does,
or raise/warn (once) with a message that names the problem and the fix."""

import copy

import pytest
import torch

import lopt_kernels
from lopt_kernels.patching import _state_of, _top_and_bottom
from tiny_models import batch, tiny_model


def _top_grads(model):
    top, _ = _top_and_bottom(_state_of(model))
    return {n: p.grad for n, p in model.named_parameters() if id(p) in top}


# ----------------------------------------------------------------------------------------------
# case 1: a micro-batch whose labels are all -100
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "liger"])
@pytest.mark.parametrize("num_items", [None, 0, "tensor0"])
def test_case1_all_labels_ignored_gives_zero_task_gradients_not_nan(impl, num_items):
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, fused_ce=impl)
    ids = batch()["input_ids"]
    labels = torch.full_like(ids, -100)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(0) if num_items == "tensor0" else 0}
    out = model(input_ids=ids, labels=labels, **kw)
    ref = original(input_ids=ids, labels=labels, **kw)
    assert torch.isnan(ref.loss) and torch.isnan(out.task_loss) and torch.isnan(out.loss)  # as unpatched
    out.loss.backward()
    ref.loss.backward()
    ref_grads = dict(original.named_parameters())
    for name, grad in _top_grads(model).items():
        expected = ref_grads[name].grad
        assert grad is not None and torch.equal(grad, expected), name  # zero, exactly as unpatched
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        if num_items is not None and p.grad is not None:
            # no label token in the whole window: the micro-batch's aux weight n_mb / num_items is 0, not NaN
            assert not p.grad.any(), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
