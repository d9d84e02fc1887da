"""One call of the fused loss as every implementation receives it (the flat argument list stays at the
``torch.library`` boundary, ``custom_op``)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LossRequest:
    """What to compute: the loss of ``y`` against ``x`` and, if ``compute_grads``, the gradients of
    ``grad_scale * loss`` (the six parameter gradients also times ``param_scale``)."""

    y: torch.Tensor  # (n, h) rows of the block output: a view of the caller's tensor where its strides allow
    x: torch.Tensor  # (n, h) target rows, likewise
    params: tuple  # (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    eps: float  # LayerNorm epsilon
    grad_scale: float | torch.Tensor  # a float, or a one-element tensor read on the device (no host sync)
    compute_grads: bool
    chunk_rows: int
    row_mask: torch.Tensor | None  # (n,) bool, contiguous: the rows the loss counts
    counted: int | torch.Tensor  # the rows the mean runs over: n, or the mask's count on the device (>= 1)
    param_scale: float = 1.0

    @classmethod
    def of(cls, y, x, params, eps, grad_scale, compute_grads, chunk_rows, row_mask=None, param_scale=1.0):
        """The request for ``y``/``x`` of any leading shape (flattened to rows) and an optional row mask."""
        h = y.shape[-1]
        y2, x2 = y.reshape(-1, h), x.reshape(-1, h)  # views whenever the strides allow: the kernels take strides
        if row_mask is None:
            counted = y2.shape[0]
        else:  # the loss is the mean over the counted rows; over none it is 0 (the count stays on the device)
            row_mask = row_mask.reshape(-1).contiguous()
            counted = row_mask.sum(dtype=torch.float32).clamp_min(1.0)
        return cls(y2, x2, tuple(params), eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale)

    def fields(self) -> tuple:
        """The fields in their declared order (for an implementation's local names); the tensors themselves, not
        copies (``dataclasses.astuple`` would deep-copy them)."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))
