"""The ``torch.library`` custom ops (opaque to torch.compile, with fake implementations) and their FLOP formulas.

The flat argument list lives here only: it is what ``torch.library`` schemas need.
"""

from __future__ import annotations

import math

import torch
from torch.utils import flop_counter

from .request import LossRequest
from .torch_twin import torch_loss_and_grads
from .triton_driver import triton_loss_and_grads

def _run_impl(y, x, params, eps, grad_scale, compute_grads, backend, chunk_rows, row_mask=None, param_scale=1.0):
    request = LossRequest.of(y, x, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, param_scale)
    # The op fixes its own precision (fp32 statistics and accumulation): an enclosing autocast
    # region must not recast its matmuls.
    with torch.autocast(y.device.type, enabled=False):
        implementation = triton_loss_and_grads if backend == "triton" else torch_loss_and_grads
        loss, grads = implementation(request)
    if grads is not None:
        grads = (grads[0].reshape(y.shape), *grads[1:])
    return loss, grads


@torch.library.custom_op(
    "lopt_kernels::reconstruction_loss",
    mutates_args=(),
    schema=(
        "(Tensor y, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor down_weight, Tensor down_bias, "
        "Tensor up_weight, Tensor up_bias, float eps, str backend, int chunk_rows, Tensor? row_mask) -> Tensor"
    ),
)
def _loss_op(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows, row_mask,
):
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    loss, _ = _run_impl(y, x, params, eps, 1.0, False, backend, chunk_rows, row_mask)
    return loss


@_loss_op.register_fake
def _loss_op_fake(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows, row_mask,
):
    return y.new_empty((), dtype=torch.float32)


@torch.library.custom_op(
    "lopt_kernels::reconstruction_loss_and_grads",
    mutates_args=(),
    schema=(
        "(Tensor y, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor down_weight, Tensor down_bias, "
        "Tensor up_weight, Tensor up_bias, float eps, float grad_scale, Tensor? grad_scale_tensor, str backend, "
        "int chunk_rows, Tensor? row_mask, float param_grad_scale=1.0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _loss_and_grads_op(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, grad_scale, grad_scale_tensor,
    backend, chunk_rows, row_mask, param_grad_scale=1.0,
):
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    scale = grad_scale_tensor if grad_scale_tensor is not None else grad_scale
    loss, grads = _run_impl(y, x, params, eps, scale, True, backend, chunk_rows, row_mask, param_grad_scale)
    return (loss, *grads)


@_loss_and_grads_op.register_fake
def _loss_and_grads_op_fake(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, grad_scale, grad_scale_tensor,
    backend, chunk_rows, row_mask, param_grad_scale=1.0,
):
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    return (y.new_empty((), dtype=torch.float32), y.new_empty(y.shape), *(p.new_empty(p.shape) for p in params))


def _matmul_flops(y_shape, down_weight_shape) -> int:
    """2 * rows * h * r: one of the aux head's two projections over every row."""
    rows = math.prod(y_shape[:-1])
    r, h = down_weight_shape
    return 2 * rows * h * r


# FLOP counts (torch.utils.flop_counter) for the custom ops, which the counter would otherwise see as zero:
# the forward is two projections; the gradients add four more (two weight gradients, two input gradients).
@flop_counter.register_flop_formula(torch.ops.lopt_kernels.reconstruction_loss)
def _loss_op_flops(y_shape, x_shape, nw, nb, down_weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _matmul_flops(y_shape, down_weight_shape)


@flop_counter.register_flop_formula(torch.ops.lopt_kernels.reconstruction_loss_and_grads)
def _loss_and_grads_op_flops(y_shape, x_shape, nw, nb, down_weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 6 * _matmul_flops(y_shape, down_weight_shape)
