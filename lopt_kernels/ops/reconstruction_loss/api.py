"""Public API of the fused reconstruction loss: the functions and the autograd Function."""

from __future__ import annotations

import math

import torch

from . import custom_op  # noqa: F401 - registers torch.ops.lopt_kernels.reconstruction_loss*
from .checks import check_reconstruction_inputs, check_row_mask, default_chunk_rows, resolve_backend

def reconstruction_loss_and_grads(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
    eps: float = 1e-5, grad_scale=1.0, compute_grads: bool = True, backend: str = "auto",
    chunk_rows: int | None = None, row_mask: torch.Tensor | None = None, param_grad_scale: float = 1.0,
):
    """Loss (fp32 scalar) and, if ``compute_grads``, the gradients of ``grad_scale * loss``.

    ``param_grad_scale`` multiplies the six parameter gradients (not ``grad_y``) in fp32 before their cast to the
    parameters' dtype: a caller that scales the loss up for ``grad_y``'s sake (fp16 activations) scales them back
    there, where the fp16 cast would overflow.

    ``row_mask`` (bool, ``y.shape[:-1]``, on ``y``'s device) restricts the loss to the rows where it is true:
    the mean over those rows (0 over none), every gradient zero on the others, with no gather and no host sync.

    Returns ``(loss, grads)`` with ``grads = (grad_y, grad_norm_weight, grad_norm_bias, grad_down_weight,
    grad_down_bias, grad_up_weight, grad_up_bias)`` (``grad_y`` shaped like ``y`` in ``y.dtype``, parameter
    gradients in the parameters' dtype), or ``None`` when ``compute_grads`` is false. ``grad_scale`` is a
    float or a 0-d tensor (read on the device, no host sync). The results are plain tensors outside the
    autograd graph; use :func:`reconstruction_loss` for a differentiable loss.

    Meta tensors (shape tracing, FSDP's deferred init): with every input on the meta device, and a ``grad_scale`` that is
    a float or any one-element tensor, the results are meta tensors of the shapes and dtypes above, for either backend
    (the custom ops' fake implementations run, not the kernels). A meta ``grad_scale`` for real inputs is a ValueError.
    """
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    check_reconstruction_inputs(y, x, *params)
    check_row_mask(row_mask, y)
    impl = resolve_backend(backend, y.device)
    h = y.shape[-1]
    n = math.prod(y.shape[:-1])
    if n == 0 or h == 0:
        raise ValueError(f"reconstruction loss: y {tuple(y.shape)} is empty (no rows or no hidden features)")
    if down_weight.shape[0] == 0:
        raise ValueError(f"reconstruction loss: the decoder's bottleneck is empty (down_weight {tuple(down_weight.shape)})")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)):
        raise ValueError(f"reconstruction loss: chunk_rows must be an int or None, got {chunk_rows!r}")
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(n, h, down_weight.shape[0])
    if chunk < 1:
        raise ValueError(f"reconstruction loss: chunk_rows must be >= 1, got {chunk}")
    if isinstance(grad_scale, torch.Tensor) and grad_scale.numel() != 1:
        raise ValueError(f"reconstruction loss: grad_scale must be a float or a one-element tensor, got shape "
                         f"{tuple(grad_scale.shape)}")
    if isinstance(grad_scale, torch.Tensor) and grad_scale.device.type == "meta" and y.device.type != "meta":
        raise ValueError(f"reconstruction loss: grad_scale is a meta tensor (a shape without a value) but y is on "
                         f"{y.device}: pass a float or a tensor that holds the scale (meta tensors are for tracing with "
                         f"every input on meta, which gives meta results of the right shapes)")
    with torch.no_grad():
        if not compute_grads:
            return torch.ops.lopt_kernels.reconstruction_loss(
                y, x, *params, float(eps), impl, int(chunk), row_mask), None
        if isinstance(grad_scale, torch.Tensor):
            scale, scale_tensor = 1.0, grad_scale.detach().to(device=y.device, dtype=torch.float32)
        else:
            scale, scale_tensor = float(grad_scale), None
        loss, *grads = torch.ops.lopt_kernels.reconstruction_loss_and_grads(
            y, x, *params, float(eps), scale, scale_tensor, impl, int(chunk), row_mask, float(param_grad_scale)
        )
    return loss, tuple(grads)


class ReconstructionLossFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed during the forward and scaled by the incoming gradient.

    The backward scales the saved gradients in place, so the graph supports one backward pass only.
    """

    @staticmethod
    def forward(ctx, y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows,
                row_mask):
        params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
        needs = ctx.needs_input_grad
        compute = needs[0] or any(needs[2:8])
        loss, grads = reconstruction_loss_and_grads(
            y, x, *params, eps=eps, compute_grads=compute, backend=backend, chunk_rows=chunk_rows, row_mask=row_mask
        )
        if compute:
            ctx.save_for_backward(*grads)
        ctx.computed = compute
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the precomputed gradients have no graph of their own
            raise RuntimeError(
                "lopt_kernels: the fused reconstruction loss cannot be differentiated twice (create_graph=True, e.g. a "
                "gradient penalty): its gradients are computed in its forward, without a graph. Use the unfused "
                "PyTorch expression of the loss for higher-order gradients."
            )
        if not ctx.computed:
            return (None,) * 12
        grad_y, *param_grads = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # Scaled in place (a 0-d fp32 multiplier keeps each tensor's dtype, one rounding): no second
        # y-sized buffer. A second backward through the same graph (retain_graph=True) therefore raises
        # autograd's "modified by an inplace operation" error instead of returning rescaled gradients.
        scaled_y = grad_y.mul_(grad_loss) if needs[0] else None
        scaled = [g.mul_(grad_loss) if needs[2 + i] else None for i, g in enumerate(param_grads)]
        return (scaled_y, None, *scaled, None, None, None, None)


def reconstruction_loss(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
    eps: float = 1e-5, backend: str = "auto", chunk_rows: int | None = None, row_mask: torch.Tensor | None = None,
):
    """Differentiable fused reconstruction loss (fp32 scalar). The target ``x`` receives no gradient.
    ``row_mask`` as in :func:`reconstruction_loss_and_grads`.

    Without grad mode or with no input requiring grad, only the loss is computed (no backward work).
    """
    differentiable = (y, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in differentiable):
        return ReconstructionLossFunction.apply(
            y, x.detach(), norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows,
            row_mask,
        )
    loss, _ = reconstruction_loss_and_grads(
        y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias,
        eps=eps, compute_grads=False, backend=backend, chunk_rows=chunk_rows, row_mask=row_mask,
    )
    return loss
