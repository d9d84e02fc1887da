"""patch(backend="triton") runs the Triton kernels (under TRITON_INTERPRET=1 on CPU) on the boundary
and gives the gradients backend="torch" gives."""

import copy

import pytest
import torch

import lopt_kernels
from reference import assert_grads_close
from tiny_models import batch, tiny_model


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_triton_backend_matches_torch_backend(family, mode, monkeypatch):
    base = tiny_model(family)
    on_triton, on_torch = copy.deepcopy(base), copy.deepcopy(base)
    lopt_kernels.patch(on_triton, backend="triton", mode=mode, num_blocks=3)
    lopt_kernels.patch(on_torch, backend="torch", mode=mode, num_blocks=3)
    on_torch.lopt_aux_decoders.load_state_dict(on_triton.lopt_aux_decoders.state_dict())

    from lopt_kernels.ops.reconstruction_loss import custom_op as op
    launched = []
    original = op.triton_loss_and_grads
    monkeypatch.setattr(op, "triton_loss_and_grads", lambda *a: launched.append(1) or original(*a))
    b = batch()
    out_triton, out_torch = on_triton(**b), on_torch(**b)
    out_triton.loss.backward()
    out_torch.loss.backward()
    assert launched, "the Triton kernels did not run"
    torch.testing.assert_close(out_triton.aux_loss, out_torch.aux_loss, rtol=1e-5, atol=1e-9)
    assert_grads_close({n: p.grad for n, p in on_triton.named_parameters()},
                       {n: p.grad for n, p in on_torch.named_parameters()}, rtol=1e-4)
