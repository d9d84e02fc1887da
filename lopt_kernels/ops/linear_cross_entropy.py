"""Causal-LM task loss without logits: a fused linear cross-entropy.

This op writes no kernel of its own: it dispatches to the best existing implementations,
Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (Triton, CUDA; supports final-logit
soft-capping) and torch's native chunked ``torch.nn.functional.linear_cross_entropy``
(torch >= 2.13, any device). Both compute ``cross_entropy(hidden @ W.T + b, target)`` chunk by
chunk so the (tokens x vocab) logits never exist whole.

Semantics match transformers' ``ForCausalLMLoss``: fp32 loss, ``ignore_index=-100``, mean over
non-ignored targets, or ``sum / num_items_in_batch`` when that is given.
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
    target = shift_labels.reshape(-1).to(hidden2.device)
    if target.shape[0] != hidden2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden2.shape[0]} hidden rows but {target.shape[0]} labels")
    chosen = resolve_implementation(impl, hidden.device, softcap)
    if chosen is None:
        raise ValueError(f"no fused linear cross-entropy honours softcap={softcap} on {hidden.device.type} with impl={impl!r}")
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if chosen == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: PLC0415

        loss = LigerFusedLinearCrossEntropyFunction.apply(
            hidden2, weight, target, bias, None, IGNORE_INDEX, 0.0, 0.0, reduction, softcap
        )
        loss = loss[0] if isinstance(loss, tuple) else loss
    else:
        loss = F.linear_cross_entropy(
            hidden2, weight, target, linear_bias=bias, reduction=reduction, ignore_index=IGNORE_INDEX,
            options=torch.nn.LinearCrossEntropyOptions(),
        )
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
