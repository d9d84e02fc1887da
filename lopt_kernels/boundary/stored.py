"""Stored boundary: the reference code's behaviour. The block keeps its autograd graph (every
activation stays alive until the caller's backward) and the aux loss is differentiated by ordinary
autograd. Same gradients as the other modes, end-to-end training's activation memory."""

from __future__ import annotations

import torch

from .common import BoundarySpec, StopGradient, _rows


def stored_boundary(spec: BoundarySpec, y: torch.Tensor, x: torch.Tensor):
    """Returns ``(hand_off, aux)``: ``y`` with the gradient stopped, and the block's differentiable aux loss."""
    aux = spec.decoder.reconstruction_loss(_rows(y, spec.token_rows), _rows(x.detach(), spec.token_rows),
                                           backend=spec.backend)
    hand_off = StopGradient.apply(y) if y.requires_grad else y.detach().requires_grad_(True)
    return hand_off, aux
