"""The chunked PyTorch twin of the fused loss: runs on CPU tensors and is the reference the kernels must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .request import LossRequest


def torch_loss_and_grads(request: LossRequest):
    """Chunked PyTorch implementation; every intermediate in fp32.

    Uses ATen's fused LayerNorm / GELU forward and backward kernels on fp32 chunks, so it costs about
    what eager PyTorch costs in time while holding at most one chunk of intermediates.
    """
    y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale = request.fields()
    n, h = y2.shape
    w, b, wd, bd, wu, bu = (p.float() for p in params)
    loss_sum = torch.zeros((), dtype=torch.float32, device=y2.device)
    single_chunk = chunk_rows >= n
    if compute_grads:
        grad_y = None if single_chunk else torch.empty(y2.shape, dtype=y2.dtype, device=y2.device)
        # contiguous whatever the parameters' layout (a transposed weight view): the fake kernel's strides
        acc = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (w, b, wd, bd, wu, bu)]
        grad_coef = grad_scale * (2.0 / (counted * h))
    for start in range(0, n, chunk_rows):
        yc = y2[start : start + chunk_rows].float()
        xc = x2[start : start + chunk_rows].float()
        if row_mask is not None:  # excluded rows of y as zeros (finite LN statistics whatever they hold); x's
            keep = row_mask[start : start + chunk_rows, None]  # are dropped by the where on diff below
            yc = torch.where(keep, yc, 0.0)
        normed, mean, rstd = torch.native_layer_norm(yc, (h,), w, b, eps)
        z = torch.addmm(bd, normed, wd.t())
        a = F.gelu(z)
        diff = torch.addmm(bu, a, wu.t()).sub_(xc)
        if row_mask is not None:  # excluded rows: exactly 0, so is every gradient downstream of them
            diff = torch.where(keep, diff, 0.0)
        loss_sum += torch.dot(diff.view(-1), diff.view(-1))
        if not compute_grads:
            del normed, mean, rstd, z, a, diff
            continue
        d_recon = diff.mul_(grad_coef)
        acc[4].addmm_(d_recon.t(), a)
        acc[5].add_(d_recon.sum(0))
        d_z = torch.ops.aten.gelu_backward(d_recon @ wu, z)
        del d_recon, diff, a, z
        acc[2].addmm_(d_z.t(), normed)
        acc[3].add_(d_z.sum(0))
        d_normed = d_z @ wd
        del d_z, normed
        d_y, d_w, d_b = torch.ops.aten.native_layer_norm_backward(
            d_normed, yc, (h,), mean, rstd, w, b, [True, True, True]
        )
        del d_normed
        acc[0].add_(d_w)
        acc[1].add_(d_b)
        if single_chunk:
            grad_y = d_y.to(y2.dtype)
        else:
            grad_y[start : start + chunk_rows] = d_y
        del d_y, d_w, d_b, mean, rstd
    loss = loss_sum / (counted * h)
    if not compute_grads:
        return loss, None
    if param_scale != 1.0:
        torch._foreach_mul_(acc, param_scale)
    return loss, (grad_y, *(g.to(p.dtype) for g, p in zip(acc, params)))
