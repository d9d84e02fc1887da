"""Causal-LM task loss without logits: a fused linear cross-entropy.

This op writes no kernel of its own: it dispatches to the best existing implementations,
Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (Triton, CUDA; supports final-logit
soft-capping) and torch's native chunked ``torch.nn.functional.linear_cross_entropy``
(torch >= 2.13, any device). Both compute ``cross_entropy(hidden @ W.T + b, target)`` chunk by
chunk so the (tokens x vocab) logits never exist whole.

Semantics match transformers' ``ForCausalLMLoss``: fp32 loss, ``ignore_index=-100``, mean over
non-ignored targets, or ``sum / num_items_in_batch`` when that is given. A batch with no counted
target (every label -100, or ``num_items_in_batch == 0``) gives the model's NaN loss and, as the
model's ``cross_entropy`` does, zero gradients (never NaN ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "liger", "torch")
IGNORE_INDEX = -100


def torch_linear_cross_entropy_available() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def resolve_implementation(impl: str, device: torch.device, softcap: float | None) -> str | None:
    """The implementation that will run, or None when no fused one can honour the request."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"fused linear cross-entropy implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            return "liger"
        impl = "torch"
    if impl == "torch" and (softcap is not None or not torch_linear_cross_entropy_available()):
        return None  # torch's op has no soft-capping
    return impl


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
    """``labels[..., 1:]`` padded with -100 at the end: position t predicts token t + 1."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    num_items_in_batch=None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal-LM loss of ``hidden`` (..., h) through the head ``weight`` (V, h) against ``shift_labels`` (...)."""
    h = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, h)
    target = shift_labels.reshape(-1).to(hidden2.device, non_blocking=True)
    if target.shape[0] != hidden2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden2.shape[0]} hidden rows but {target.shape[0]} labels")
    chosen = resolve_implementation(impl, hidden.device, softcap)
    if chosen is None:
        raise ValueError(f"no fused linear cross-entropy honours softcap={softcap} on {hidden.device.type} with impl={impl!r}")
    # Always the summed loss, divided here: ``0 / 0`` is the model's NaN loss for a batch without counted
    # targets, while the gradient of that division is taken as 0 (not inf, which the fused ops would turn
    # into NaN gradients against their zero per-row gradients).
    if chosen == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: PLC0415

        loss = LigerFusedLinearCrossEntropyFunction.apply(
            hidden2, weight, target, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", softcap
        )
        loss = loss[0] if isinstance(loss, tuple) else loss
    elif hidden2.dtype == torch.float32:
        # torch's own "sum" reduction: its "none" reduction runs about twice as long on CPU (2 cores, 1024 rows,
        # h 1024, vocab 32000: 26 s against 11-18 s forward + backward)
        loss = F.linear_cross_entropy(
            hidden2, weight, target, linear_bias=bias, reduction="sum", ignore_index=IGNORE_INDEX,
            options=torch.nn.LinearCrossEntropyOptions(),
        )
    else:
        # Per-row losses summed in fp32: torch's op returns a "sum" reduction in the input dtype, which in bf16
        # is ~1% off the model's loss (it upcasts logits to fp32); the per-row values round independently.
        loss = F.linear_cross_entropy(
            hidden2, weight, target, linear_bias=bias, reduction="none", ignore_index=IGNORE_INDEX,
            options=torch.nn.LinearCrossEntropyOptions(),
        ).float().sum()
    loss = loss.float()
    if num_items_in_batch is None:
        denominator = (target != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        # non_blocking: a host tensor's copy must not wait for the device (no sync in the training step).
        denominator = num_items_in_batch.to(loss.device, non_blocking=True)
    else:
        denominator = num_items_in_batch
    return _SafeDivide.apply(loss, denominator) if torch.is_tensor(denominator) else _divide_by_number(loss, denominator)


def _divide_by_number(loss: torch.Tensor, denominator) -> torch.Tensor:
    if denominator == 0:
        return _SafeDivide.apply(loss, torch.zeros((), device=loss.device))
    return loss / denominator


class _SafeDivide(torch.autograd.Function):
    """``numerator / denominator`` whose gradient is 0 where the denominator is 0 (no inf, so no NaN
    gradients from the fused ops' zero rows). No host-device sync: it stays a tensor expression."""

    @staticmethod
    def forward(ctx, numerator, denominator):
        denominator = denominator.to(numerator.dtype)
        ctx.save_for_backward(denominator)
        return numerator / denominator

    @staticmethod
    def backward(ctx, grad):
        (denominator,) = ctx.saved_tensors
        safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        return torch.where(denominator == 0, torch.zeros_like(grad), grad / safe), None
