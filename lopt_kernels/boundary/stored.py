"""Stored boundary: the reference code's behaviour. The block keeps its autograd graph (every
activation stays alive until the caller's backward) and the aux loss's gradient flows into it by
ordinary autograd. Same gradients as the other modes, end-to-end training's activation memory."""

from __future__ import annotations

import torch

from .common import (BoundaryMode, BoundarySpec, accumulate_gathered, as_hand_off, is_zero3, local_loss_and_grads,
                     zero3_anchor)


class StoredBoundary(torch.autograd.Function):
    """``(hand_off, aux) = f(y, x, *decoder_params)``: ``y`` with the gradient stopped, and the block's aux
    loss, whose gradients (computed with it by the fused op) flow into ``y``'s stored graph and the decoder.
    One node for both outputs, so that its backward sees a loss that reached the hand-off without the aux
    term (the same one-time warning as the other modes)."""

    @staticmethod
    def forward(ctx, spec: BoundarySpec, y, x, *decoder_params):
        needs = ctx.needs_input_grad
        # ZeRO-3: the decoder parameters are not inputs (their gradients go in by accumulate_gathered)
        params = tuple(spec.decoder.decoder_parameters())
        ctx.zero3 = params if is_zero3(params) else None
        zero3_needs = ctx.zero3 is not None and any(p.requires_grad for p in ctx.zero3)
        ctx.computed = needs[1] or any(needs[3:]) or zero3_needs
        aux, grads = local_loss_and_grads(spec, y.detach(), x.detach(), compute_grads=ctx.computed)
        if ctx.computed:
            ctx.save_for_backward(*grads)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return y.detach(), aux

    @staticmethod
    def backward(ctx, grad_hand_off, grad_aux):
        needs = ctx.needs_input_grad
        if grad_aux is None:
            # The caller's loss does not contain this block's aux term: nothing trains the block.
            if grad_hand_off is not None and ctx.spec.on_missing_aux is not None:
                ctx.spec.on_missing_aux()
            return (None,) * len(needs)
        if not ctx.computed:
            return (None,) * len(needs)
        grad_y, *param_grads = ctx.saved_tensors
        scaled_y = grad_y * grad_aux if needs[1] else None
        if ctx.zero3 is not None:
            accumulate_gathered([[(p, g * grad_aux) for p, g in zip(ctx.zero3, param_grads)]])
            return (None, scaled_y, None, *(None for _ in needs[3:]))
        scaled = [g * grad_aux if need else None for g, need in zip(param_grads, needs[3:])]
        return (None, scaled_y, None, *scaled)


def stored_boundary(spec: BoundarySpec, y: torch.Tensor, x: torch.Tensor):
    """Returns ``(hand_off, aux)``: ``y`` with the gradient stopped, and the block's differentiable aux loss."""
    params = spec.decoder.decoder_parameters()
    hand_off, aux = StoredBoundary.apply(spec, y, x.detach(), *((zero3_anchor(),) if is_zero3(params) else params))
    return as_hand_off(hand_off), aux


class StoredMode(BoundaryMode):
    """Stored mode in the hooks: each block runs with its graph; only its input is kept until its last layer."""

    name = "stored"

    def begin_block(self, block, layers, hidden, rest, kwargs):
        self.tapes[block] = hidden

    def end_block(self, block, spec, y):
        return stored_boundary(spec, y, self.tapes.pop(block))
