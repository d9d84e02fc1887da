"""What every boundary mode shares: the per-boundary spec, the block's reconstruction loss over the
counted rows, and the stop-gradient hand-off.

Nothing in ``lopt_kernels.boundary`` knows about transformers: a block is a list of layer modules.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
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
    row_mask: torch.Tensor | None = None  # flat bool: the rows the aux loss counts (None: all)
    # True: block gradients go straight into ``.grad`` as the rebuild produces them (no block-sized set
    # held); False: they return through the Function, so that each parameter's AccumulateGrad runs once
    # in the caller's backward, as DDP's reducer requires. (activation-free mode only)
    accumulate_into_grad: bool = True
    # eager mode under FSDP2: the local backward is an ordinary one whose gradients FSDP2 reduce-scatters, held sharded
    sharded_grads: bool = False
    # Called when a backward reaches the hand-off but the loss holds no aux term (the block stays untrained).
    on_missing_aux: Callable[[], None] | None = None


def zero3_partitioned(params) -> list[torch.Tensor]:
    """The DeepSpeed ZeRO-3 parameters among ``params`` whose data is partitioned away right now."""
    return [p for p in params if hasattr(p, "ds_id") and getattr(p.ds_status, "name", "") == "NOT_AVAILABLE"]


@contextmanager
def gathered(params):
    """Whole parameters inside the block: DeepSpeed ZeRO-3 keeps only a partition of each outside the forward
    of the module that owns it, and the fused op reads the decoder's parameters directly. A collective on
    every rank (each runs the same boundaries); nothing to do without ZeRO-3."""
    missing = zero3_partitioned(params)
    if not missing:
        yield
        return
    import deepspeed  # noqa: PLC0415 - only ZeRO-3 parameters get here

    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
        yield


def is_zero3(params) -> bool:
    """Whether DeepSpeed ZeRO-3 manages these parameters (it partitions them outside their modules' forward)."""
    return any(hasattr(p, "ds_id") for p in params)


def zero3_anchor() -> torch.Tensor:
    """A tiny leaf that requires grad, the one input through which a boundary Function that takes no ZeRO-3
    parameter (see ``accumulate_gathered``) is still reached by the caller's backward."""
    return torch.zeros((), requires_grad=True)


def accumulate_gathered(groups) -> None:
    """Under ZeRO-3, hand gradients computed off the autograd graph to their parameters. Each group of
    ``(param, grad)`` pairs is gathered whole and backpropagated through the parameters' own AccumulateGrad
    (a nested backward), where DeepSpeed's reduction hooks run, once per parameter and backward, as for any
    parameter a module used. A Function must not take partitioned parameters as inputs and return their
    gradients itself: its gradient edges would record the empty partition's shape (and AccumulateGrad would
    see a partitioned parameter)."""
    for group in groups:
        pairs = [(p, g) for p, g in group if g is not None and p.requires_grad]
        if not pairs:
            continue
        with gathered([p for p, _ in pairs]):
            with torch.enable_grad():
                views = [p.view_as(p) for p, _ in pairs]
            torch.autograd.backward(views, [g.to(p.dtype) for p, g in pairs])


def local_loss_and_grads(spec: BoundarySpec, y: torch.Tensor, x: torch.Tensor, *, grad_scale=1.0, compute_grads=True,
                         param_grad_scale: float = 1.0):
    """The block's reconstruction loss over the counted rows; grads as ``reconstruction_loss_and_grads``
    with ``grad_y`` shaped like ``y`` (zero on excluded rows). Over no rows the loss is 0 and every gradient
    is zero."""
    decoder = spec.decoder
    params = decoder.decoder_parameters()
    row_mask = None if spec.row_mask is None else spec.row_mask.to(y.device, non_blocking=True)
    with gathered(params):
        return reconstruction_loss_and_grads(
            y, x, *params, eps=decoder.norm.eps, grad_scale=grad_scale, compute_grads=compute_grads,
            backend=spec.backend, row_mask=row_mask, param_grad_scale=param_grad_scale,
        )


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


def as_hand_off(t: torch.Tensor) -> torch.Tensor:
    """The next block's input: no gradient flows back through it, but it requires grad, so that a
    reentrant-checkpointed top half still sees an input that requires grad."""
    return t if t.requires_grad else t.detach().requires_grad_(True)
