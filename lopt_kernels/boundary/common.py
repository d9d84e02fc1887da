"""What every boundary mode shares: the per-boundary spec, the block's reconstruction loss over the
counted rows, and the stop-gradient hand-off.

Nothing in ``lopt_kernels.boundary`` knows about transformers: a block is a list of layer modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops.reconstruction_loss import reconstruction_loss_and_grads


@dataclass
class BoundarySpec:
    """Static configuration of one boundary, shared by every forward pass."""

    decoder: torch.nn.Module
    backend: str
    layerwise_rebuild: bool
    replay_guard: object  # object with a boolean attribute ``replaying``, set while a block is replayed
    token_rows: torch.Tensor | None = None  # flat indices of the rows the aux loss counts (None: all)
    # True: block gradients go straight into ``.grad`` as the rebuild produces them (no block-sized set
    # held); False: they return through the Function, so that each parameter's AccumulateGrad runs once
    # in the caller's backward, as DDP's reducer requires. (activation-free mode only)
    accumulate_into_grad: bool = True
    # Called when a backward reaches the hand-off but the loss holds no aux term (the block stays untrained).
    on_missing_aux: Callable[[], None] | None = None


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The (rows, h) view of ``t`` that the aux loss counts (a gather only when some rows are excluded)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _unrows(grad_rows: torch.Tensor, rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Scatter row gradients back to the shape of ``like`` (zero on excluded rows)."""
    if rows is None:
        return grad_rows.reshape(like.shape)
    full = torch.zeros(like.numel() // like.shape[-1], like.shape[-1], dtype=grad_rows.dtype, device=grad_rows.device)
    full.index_copy_(0, rows, grad_rows)
    return full.reshape(like.shape)


def counts_no_rows(spec: BoundarySpec) -> bool:
    """Whether the aux loss counts no position at all (``aux_mask="tokens"`` on a batch without tokens)."""
    return spec.token_rows is not None and spec.token_rows.numel() == 0


def local_loss_and_grads(spec: BoundarySpec, y: torch.Tensor, x: torch.Tensor, *, grad_scale=1.0, compute_grads=True):
    """The block's reconstruction loss over the counted rows; grads as ``reconstruction_loss_and_grads``
    with ``grad_y`` shaped like ``y``. Over no rows the loss is 0 and every gradient is zero."""
    decoder = spec.decoder
    if counts_no_rows(spec):
        loss = torch.zeros((), dtype=torch.float32, device=y.device)
        if not compute_grads:
            return loss, None
        return loss, (torch.zeros_like(y), *(torch.zeros_like(p) for p in decoder.decoder_parameters()))
    loss, grads = reconstruction_loss_and_grads(
        _rows(y, spec.token_rows), _rows(x, spec.token_rows), *decoder.decoder_parameters(), eps=decoder.norm.eps,
        grad_scale=grad_scale, compute_grads=compute_grads, backend=spec.backend,
    )
    if grads is not None:
        grads = (_unrows(grads[0], spec.token_rows, y), *grads[1:])
    return loss, grads


def hidden_of(output):
    """The hidden-state tensor of a layer's output (tensor or tuple whose first item is it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def block_params(layers, decoder) -> list[torch.Tensor]:
    """The trainable parameters a boundary takes as inputs: the block's layers', then the decoder's."""
    seen = set()
    params = []
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for p in decoder.decoder_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


class StopGradient(torch.autograd.Function):
    """Identity forward; no gradient goes back. Keeps ``requires_grad`` on the output so that a
    reentrant-checkpointed top half still sees an input that requires grad."""

    @staticmethod
    def forward(ctx, y):
        return y.detach()

    @staticmethod
    def backward(ctx, grad):
        return None


def as_hand_off(t: torch.Tensor) -> torch.Tensor:
    """The next block's input: no gradient flows back through it, but it requires grad (see StopGradient)."""
    return t if t.requires_grad else t.detach().requires_grad_(True)
