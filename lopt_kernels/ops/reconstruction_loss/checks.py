"""Input checks and settings shared by both implementations: backend choice, chunk size, shapes and masks."""

from __future__ import annotations

import math
import os

import torch

BACKENDS = ("auto", "triton", "torch")  # the values of the backend option


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto" | "triton" | "torch"`` to the implementation that runs for ``device``. On the meta device either
    backend is fine: the custom ops' fake implementations run there, no kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before importing triton, or use backend='auto'/'torch'."
        )
    return backend


def default_chunk_rows(num_rows: int, hidden: int, rank: int | None = None) -> int:
    """Rows per chunk: about 8M elements per chunk-by-hidden buffer; given the decoder's bottleneck ``rank``,
    more at large h: up to 4 * rank rows while a chunk-by-hidden buffer stays <= 32M elements (64 MiB in bf16).

    Each chunk re-reads both weights and reads and writes both fp32 weight-gradient accumulators (2 h r each)
    and launches ~12 kernels; on an H200 (bf16, rows 16384, bench/recon_sweep.py) the 8M-element rule's
    1024-row chunks at h 8192 took 1.22x the time of these 4096-row ones, its 2048-row chunks at h 4096 1.12x.
    The working set is 2 chunk x (h + r) matmul-dtype elements plus 8 bytes a row."""
    hidden = max(hidden, 1)
    rows = (8 << 20) // hidden
    if rank is not None:
        rows = max(rows, min(4 * rank, (32 << 20) // hidden))
    return max(1, min(num_rows, rows))


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
    if down_weight.dim() != 2:
        raise ValueError(f"reconstruction loss: down_weight must be 2-D (bottleneck, hidden), got shape "
                         f"{tuple(down_weight.shape)}")
    r = down_weight.shape[0]
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


def check_row_mask(row_mask, y) -> None:
    """A ``row_mask`` must be bool, one entry per row of ``y`` (``y.shape[:-1]``), on ``y``'s device."""
    if row_mask is None:
        return
    if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
        raise ValueError(f"reconstruction loss: row_mask must be a bool tensor, got "
                         f"{getattr(row_mask, 'dtype', type(row_mask).__name__)}")
    rows = math.prod(y.shape[:-1])
    if tuple(row_mask.shape) not in (tuple(y.shape[:-1]), (rows,)):
        raise ValueError(f"reconstruction loss: row_mask {tuple(row_mask.shape)} must have one entry per row of "
                         f"y {tuple(y.shape)}: shape {tuple(y.shape[:-1])} or ({rows},)")
    if row_mask.device != y.device:
        raise ValueError(f"reconstruction loss: row_mask on {row_mask.device} but y on {y.device}: move it to y's device")
