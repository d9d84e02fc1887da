"""Fused reconstruction loss of an LoPT aux decoder, forward and backward.

The op computes, for rows ``y`` (the block output) and targets ``x`` (the block input),

    loss = mean((up(gelu(down(layer_norm(y)))) - x) ** 2)        (fp32 scalar)

and, in the same pass, the gradients of ``grad_scale * loss`` with respect to ``y`` and the six
decoder parameters. Rows are processed in chunks: neither the fp32 reconstruction nor its
gradient ever exists for all rows at once; weight gradients accumulate in fp32.

Two implementations share one chunked algorithm:
- ``"torch"``: chunked PyTorch, used on CPU tensors and as the kernels' fast twin;
- ``"triton"``: Triton kernels for the row-wise parts (LayerNorm + statistics, GELU, the squared
  error and its gradient, the LayerNorm backward) around cuBLAS matmuls.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

__all__ = [
    "reconstruction_loss",
    "reconstruction_loss_and_grads",
    "check_reconstruction_inputs",
    "resolve_backend",
    "default_chunk_rows",
]

_BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto" | "triton" | "torch"`` to the implementation that runs for ``device``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before importing triton, or use backend='auto'/'torch'."
        )
    return backend


def default_chunk_rows(num_rows: int, hidden: int) -> int:
    """Rows per chunk: about 8M fp32 elements (32 MiB) per chunk-by-hidden buffer."""
    return max(1, min(num_rows, (8 * 1024 * 1024) // max(hidden, 1)))


def check_reconstruction_inputs(y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias):
    """Raise ``ValueError`` naming the offending tensors if shapes, dtypes or devices disagree."""
    named = {
        "y": y, "x": x, "norm_weight": norm_weight, "norm_bias": norm_bias, "down_weight": down_weight,
        "down_bias": down_bias, "up_weight": up_weight, "up_bias": up_bias,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"reconstruction loss: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"reconstruction loss: {name} must be a floating-point tensor, got dtype {t.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"reconstruction loss: all tensors must be on one device, got {listing}")
    if y.shape != x.shape:
        raise ValueError(f"reconstruction loss: y {tuple(y.shape)} and target x {tuple(x.shape)} must have the same shape")
    if y.dim() < 1:
        raise ValueError("reconstruction loss: y must have a hidden dimension")
    h = y.shape[-1]
    r = down_weight.shape[0] if down_weight.dim() == 2 else -1
    expected = {
        "norm_weight": (h,), "norm_bias": (h,), "down_weight": (r, h), "down_bias": (r,),
        "up_weight": (h, r), "up_bias": (h,),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            got = ", ".join(f"{n} {tuple(named[n].shape)}" for n in expected)
            raise ValueError(
                f"reconstruction loss: decoder parameters do not match hidden size {h} of y {tuple(y.shape)}: "
                f"expected {name} {shape}; got {got}"
            )
    param_dtypes = {named[n].dtype for n in expected}
    if len(param_dtypes) > 1:
        raise ValueError(f"reconstruction loss: decoder parameters must share one dtype, got {sorted(map(str, param_dtypes))}")
    if y.dtype != x.dtype:
        raise ValueError(f"reconstruction loss: y ({y.dtype}) and x ({x.dtype}) must share one dtype")


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    # d/dz [z * Phi(z)] = Phi(z) + z * phi(z)   (exact, erf-based GELU)
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _torch_loss_and_grads(y2, x2, params, eps, grad_scale, compute_grads, chunk_rows):
    """Chunked PyTorch implementation; every intermediate in fp32."""
    n, h = y2.shape
    w, b, wd, bd, wu, bu = (p.float() for p in params)
    loss_sum = torch.zeros((), dtype=torch.float32, device=y2.device)
    if compute_grads:
        grad_y = torch.empty_like(y2)
        acc = [torch.zeros_like(t) for t in (w, b, wd, bd, wu, bu)]
        grad_coef = 2.0 / (n * h)
    for start in range(0, n, chunk_rows):
        yc = y2[start : start + chunk_rows].float()
        xc = x2[start : start + chunk_rows].float()
        mean = yc.mean(-1, keepdim=True)
        centered = yc - mean
        rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
        xhat = centered * rstd
        normed = torch.addcmul(b, xhat, w)
        z = torch.addmm(bd, normed, wd.t())
        a = F.gelu(z)
        diff = torch.addmm(bu, a, wu.t()).sub_(xc)
        loss_sum += torch.dot(diff.reshape(-1), diff.reshape(-1))
        if not compute_grads:
            continue
        d_recon = diff.mul_(grad_coef * grad_scale)
        acc[4].addmm_(d_recon.t(), a)
        acc[5].add_(d_recon.sum(0))
        d_z = (d_recon @ wu).mul_(_gelu_grad(z))
        acc[2].addmm_(d_z.t(), normed)
        acc[3].add_(d_z.sum(0))
        d_normed = d_z @ wd
        acc[0].add_((d_normed * xhat).sum(0))
        acc[1].add_(d_normed.sum(0))
        d_xhat = d_normed.mul_(w)
        d_y = d_xhat - d_xhat.mean(-1, keepdim=True) - xhat * (d_xhat * xhat).mean(-1, keepdim=True)
        grad_y[start : start + chunk_rows] = d_y.mul_(rstd)
    loss = loss_sum / (n * h)
    if not compute_grads:
        return loss, None
    return loss, (grad_y, *(g.to(p.dtype) for g, p in zip(acc, params)))


def reconstruction_loss_and_grads(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
    eps: float = 1e-5, grad_scale=1.0, compute_grads: bool = True, backend: str = "auto",
    chunk_rows: int | None = None,
):
    """Loss (fp32 scalar) and, if ``compute_grads``, the gradients of ``grad_scale * loss``.

    Returns ``(loss, grads)`` with ``grads = (grad_y, grad_norm_weight, grad_norm_bias, grad_down_weight,
    grad_down_bias, grad_up_weight, grad_up_bias)`` (``grad_y`` shaped like ``y`` in ``y.dtype``, parameter
    gradients in the parameters' dtype), or ``None`` when ``compute_grads`` is false.
    """
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    check_reconstruction_inputs(y, x, *params)
    impl = resolve_backend(backend, y.device)
    shape = y.shape
    h = shape[-1]
    y2 = y.reshape(-1, h)
    x2 = x.reshape(-1, h)
    n = y2.shape[0]
    if n == 0:
        raise ValueError("reconstruction loss: y has no rows")
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(n, h)
    if chunk < 1:
        raise ValueError(f"reconstruction loss: chunk_rows must be >= 1, got {chunk}")
    if isinstance(grad_scale, torch.Tensor):
        grad_scale = grad_scale.to(device=y.device, dtype=torch.float32)
    if impl == "triton":
        from . import _reconstruction_loss_triton as tri  # noqa: PLC0415

        loss, grads = tri.loss_and_grads(y2, x2, params, eps, grad_scale, compute_grads, chunk)
    else:
        loss, grads = _torch_loss_and_grads(y2, x2, params, eps, grad_scale, compute_grads, chunk)
    if grads is not None:
        grads = (grads[0].reshape(shape), *grads[1:])
    return loss, grads


class ReconstructionLossFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed during the forward and scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows):
        params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
        needs = ctx.needs_input_grad
        compute = needs[0] or any(needs[2:8])
        loss, grads = reconstruction_loss_and_grads(
            y, x, *params, eps=eps, compute_grads=compute, backend=backend, chunk_rows=chunk_rows
        )
        if compute:
            ctx.save_for_backward(*grads)
        ctx.computed = compute
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.computed:
            return (None,) * 11
        grad_y, *param_grads = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scaled_y = grad_y * grad_loss.to(grad_y.dtype) if needs[0] else None
        scaled = [g * grad_loss.to(g.dtype) if needs[2 + i] else None for i, g in enumerate(param_grads)]
        return (scaled_y, None, *scaled, None, None, None)


def reconstruction_loss(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
    eps: float = 1e-5, backend: str = "auto", chunk_rows: int | None = None,
):
    """Differentiable fused reconstruction loss (fp32 scalar). The target ``x`` receives no gradient."""
    return ReconstructionLossFunction.apply(
        y, x.detach(), norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows
    )
