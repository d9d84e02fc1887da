"""Kernels and their autograd Functions. Nothing here imports transformers."""

from .reconstruction_loss import reconstruction_loss, reconstruction_loss_and_grads

__all__ = ["reconstruction_loss", "reconstruction_loss_and_grads"]
