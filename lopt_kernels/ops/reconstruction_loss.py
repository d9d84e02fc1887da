"""Fused reconstruction loss of an LoPT aux decoder, forward and backward.

The op computes, for rows ``y`` (the block output) and targets ``x`` (the block input),

    loss = mean((up(gelu(down(layer_norm(y)))) - x) ** 2)        (fp32 scalar)

and, in the same pass, the gradients of ``grad_scale * loss`` with respect to ``y`` and the six
decoder parameters. Rows are processed in chunks: neither the fp32 reconstruction nor its
gradient ever exists for all rows at once; weight gradients accumulate in fp32.

Two implementations share one chunked algorithm:
- ``"torch"``: chunked PyTorch, used on CPU tensors and as the kernels' fast twin;
- ``"triton"``: Triton kernels for the row-wise parts (LayerNorm + statistics, GELU, the squared
  error and its gradient, the LayerNorm backward) around cuBLAS matmuls.

Triton path, per chunk of ``m`` rows (modelled on Liger-Kernel's fused linear cross-entropy; the
matmuls run through torch in the decoder's dtype, the row-wise work runs in Triton in fp32):

1. ``_ln_forward_kernel`` reads the chunk of ``y`` once and writes the normalised rows in the matmul
   dtype, plus (only when gradients are wanted) the row ``mean`` and ``rstd`` in fp32 (8 bytes a row);
   no fp32 ``xhat`` is kept: the LayerNorm backward re-reads ``y`` and recomputes it;
2. ``proj = normed @ W_down^T`` (torch), then ``_bias_gelu_forward_kernel`` adds the bias in fp32,
   applies the exact erf GELU and writes ``act`` in the matmul dtype; ``proj`` is kept, so no fp32 ``z``
   is stored: the GELU backward recomputes ``z = proj + b_down`` in fp32 (bitwise the forward's ``z``);
3. ``recon = act @ W_up^T`` (torch), then ``_squared_error_kernel`` adds the up bias, subtracts ``x``
   (read strided, no copy), accumulates the chunk's loss into per-program fp32 partials and overwrites
   ``recon`` in place with ``d_recon = 2 * grad_scale / (N * h) * (recon - x)``, accumulating the up-bias
   gradient in per-program fp32 partials (the Liger layer_norm scheme);
4. backward: ``dW_up += d_recon^T @ act``; ``d_act = d_recon @ W_up`` (into the ``act`` buffer, which is
   spent); ``_gelu_backward_kernel`` reads ``proj`` and turns ``d_act`` in place into
   ``d_z = d_act * gelu'(z)`` with the down-bias partials; ``dW_down += d_z^T @ normed``;
   ``d_normed = d_z @ W_down`` (into the ``recon`` buffer); ``_ln_backward_kernel`` re-reads the chunk of
   ``y`` (strided), recomputes ``xhat = (y - mean) * rstd`` and writes the rows of ``grad_y`` and the
   LayerNorm weight/bias partials.

The host code runs under ``torch.cuda.device(y.device)`` (``_device_guard``): Triton launches on the
current CUDA device, so a block on another GPU (``device_map="auto"``) gets its kernels on its own device
and stream, where its matmuls run.

Weight gradients accumulate across chunks in fp32 buffers: straight into them with
``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` where the runtime supports it (a probe checks it on
values once per device type), else through an fp32 ``torch.mm(..., out_dtype=float32)`` temporary, else
(CPU) each chunk's product is rounded once to the matmul dtype before the fp32 accumulation; the first chunk
writes them (``beta=0``: no zero fill). Launches besides the chunks' (5 Triton kernels, 6 matmuls each) are five
per call: one fill of all per-program partials, the gradient coefficient, one sum of the partial rows, the loss, and
one multi-tensor copy that casts every gradient to the parameters' dtype. Chunk buffers (two ``m x h`` and two
``m x r`` in the matmul dtype, two fp32 row statistics when gradients are wanted) are the only working memory
besides ``grad_y`` itself.
``compute_grads=False`` launches the forward kernels only, without the ``mean``/``rstd`` stores. With fp16
matmuls, ``d_recon`` is stored times a power of two (on the device) that keeps it out of fp16's subnormals; the
LayerNorm backward and the final parameter gradients divide it out exactly.

Midpoint capture: the tensor handed to the top half of the model at the split point is a zero-copy
view of the block output (no clone, no ``.contiguous()``), and this op receives ``y`` as that same
storage: the kernels accept arbitrary row/column strides for ``y`` and ``x``, so the LayerNorm-forward
kernel's single read of each chunk of ``y`` is the only extra read of ``y`` the loss costs.

Both implementations are registered as ``torch.library`` custom ops (``lopt_kernels::reconstruction_loss``
for the loss only, ``lopt_kernels::reconstruction_loss_and_grads`` for the loss and the seven gradients)
with fake (meta) implementations, so ``torch.compile`` and ``FakeTensorMode`` treat the op as opaque.

Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors): numpy has no bfloat16, and the interpreter's
fp32 -> bf16 conversion truncates instead of rounding to nearest-even. The kernels therefore round
explicitly (bit arithmetic, ``ROUND_BF16``) before every bf16 store when they run interpreted, so the
interpreter reproduces the GPU's numerics; compiled kernels skip that step. All loads are converted
to fp32 before any arithmetic.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils import flop_counter
from triton.runtime.jit import JITFunction

__all__ = [
    "reconstruction_loss",
    "reconstruction_loss_and_grads",
    "check_reconstruction_inputs",
    "check_row_mask",
    "resolve_backend",
    "default_chunk_rows",
    "ReconstructionLossFunction",
]

_BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto" | "triton" | "torch"`` to the implementation that runs for ``device``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
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


def _torch_loss_and_grads(y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted,
                          param_scale=1.0):
    """Chunked PyTorch implementation; every intermediate in fp32.

    Uses ATen's fused LayerNorm / GELU forward and backward kernels on fp32 chunks, so it costs about
    what eager PyTorch costs in time while holding at most one chunk of intermediates.
    """
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


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
#
# Every kernel is persistent over row tiles: program ``pid`` handles tiles pid, pid + G, pid + 2G, ...
# of ``BLOCK_M`` rows each (G = number of programs), so per-column gradient sums stay in registers and
# are added once per launch into the program's own row of an fp32 partial buffer (no atomics; the
# partial rows are summed once after the last chunk).


@triton.jit
def _round_bf16(v, ROUND_BF16: tl.constexpr):
    """Round fp32 ``v`` to the nearest bf16-representable value (ties to even) when ``ROUND_BF16``.

    Only used under the interpreter, whose fp32 -> bf16 conversion truncates; compiled kernels convert
    with round-to-nearest-even in hardware and skip this.
    """
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        lsb = (bits >> 16) & 1
        rounded = (((bits + 0x7FFF + lsb) >> 16) << 16).to(tl.float32, bitcast=True)
        v = tl.where(v == v, rounded, v)
    return v


@triton.jit
def _ln_forward_kernel(
    Y, stride_ym, stride_yh,  # chunk of y (strided)
    W, B,  # LayerNorm weight / bias (contiguous)
    NORMED,  # out: (m, h) in the matmul dtype
    MEAN, RSTD,  # out: (m,) fp32 row statistics, only if STORE_BWD
    ROW_MASK,  # (m,) uint8: 1 where the row counts (read only if HAS_ROW_MASK)
    n_rows, n_cols, eps, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, STORE_BWD: tl.constexpr, HAS_ROW_MASK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < n_cols
    cols64 = cols.to(tl.int64)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        yv = tl.load(Y + rows64[:, None] * stride_ym + cols64[None, :] * stride_yh, mask=mask, other=0.0)
        yv = yv.to(tl.float32)
        if HAS_ROW_MASK:  # an excluded row counts as zeros: finite whatever it holds
            keep = tl.load(ROW_MASK + rows64, mask=rmask, other=0) != 0
            yv = tl.where(keep[:, None], yv, 0.0)
        mean = tl.sum(yv, axis=1) / n_cols
        centered = tl.where(mask, yv - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = centered * rstd[:, None]
        normed = xhat * w[None, :] + b[None, :]
        offs = rows64[:, None] * n_cols + cols64[None, :]
        tl.store(NORMED + offs, _round_bf16(normed, ROUND_BF16), mask=mask)
        if STORE_BWD:  # 8 bytes a row: the backward recomputes xhat from y (no m x h fp32 buffer)
            tl.store(MEAN + rows64, mean, mask=rmask)
            tl.store(RSTD + rows64, rstd, mask=rmask)


@triton.jit
def _bias_gelu_forward_kernel(
    PROJ,  # (m, r) matmul output without bias, matmul dtype
    BD,  # (r,) down bias
    ACT,  # out: (m, r) gelu(z) in the matmul dtype
    n_rows, n_cols, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_R)
    cmask = cols < n_cols
    cols64 = cols.to(tl.int64)
    bias = tl.load(BD + cols, mask=cmask, other=0.0).to(tl.float32)
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        offs = rows64[:, None] * n_cols + cols64[None, :]
        z = tl.load(PROJ + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        act = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        tl.store(ACT + offs, _round_bf16(act, ROUND_BF16), mask=mask)


@triton.jit
def _squared_error_kernel(
    RECON,  # (m, h) in/out: act @ W_up^T without bias -> d_recon (matmul dtype)
    BU,  # (h,) up bias
    X, stride_xm, stride_xh,  # chunk of the target x (strided)
    COEF,  # (1,) fp32: 2 * grad_scale / (counted rows * h)
    ROW_MASK,  # (m,) uint8: 1 where the row counts (read only if HAS_ROW_MASK)
    LOSS_PART,  # (G,) fp32 per-program partial sums of squared errors (accumulated across chunks)
    DBU_PART,  # (G, h) fp32 per-program partial up-bias gradients
    stride_part,  # row stride of the partials (one row per program)
    n_rows, n_cols, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE_GRADS: tl.constexpr, HAS_ROW_MASK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < n_cols
    cols64 = cols.to(tl.int64)
    bias = tl.load(BU + cols, mask=cmask, other=0.0).to(tl.float32)
    if COMPUTE_GRADS:
        coef = tl.load(COEF).to(tl.float32)
    loss_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_H,), dtype=tl.float32)
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        offs = rows64[:, None] * n_cols + cols64[None, :]
        recon = tl.load(RECON + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        target = tl.load(X + rows64[:, None] * stride_xm + cols64[None, :] * stride_xh, mask=mask, other=0.0)
        counted = mask
        if HAS_ROW_MASK:
            keep = tl.load(ROW_MASK + rows64, mask=rows < n_rows, other=0) != 0
            counted = mask & keep[:, None]
        # an excluded row's d_recon is stored as exactly 0, so every gradient downstream of it is 0 too
        # (no gather of the counted rows, whatever the excluded rows hold)
        diff = tl.where(counted, recon - target.to(tl.float32), 0.0)
        loss_rows += tl.sum(diff * diff, axis=1)
        if COMPUTE_GRADS:
            d_recon = diff * coef
            tl.store(RECON + offs, _round_bf16(d_recon, ROUND_BF16), mask=mask)
            dbias += tl.sum(d_recon, axis=0)
    loss_part = LOSS_PART + pid.to(tl.int64) * stride_part
    tl.store(loss_part, tl.load(loss_part) + tl.sum(loss_rows, axis=0))
    if COMPUTE_GRADS:
        part = DBU_PART + pid.to(tl.int64) * stride_part + cols64
        tl.store(part, tl.load(part, mask=cmask, other=0.0) + dbias, mask=cmask)


@triton.jit
def _gelu_backward_kernel(
    GRAD,  # (m, r) in/out: d_act -> d_z (matmul dtype)
    PROJ,  # (m, r) the forward's matmul output without bias (matmul dtype), kept for this kernel
    BD,  # (r,) down bias
    DBD_PART,  # (G, r) fp32 per-program partial down-bias gradients
    stride_part,  # row stride of the partials (one row per program)
    n_rows, n_cols, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_R)
    cmask = cols < n_cols
    cols64 = cols.to(tl.int64)
    bias = tl.load(BD + cols, mask=cmask, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_R,), dtype=tl.float32)
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        offs = rows64[:, None] * n_cols + cols64[None, :]
        d_act = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
        # the forward's fp32 pre-activation, recomputed exactly as ``_bias_gelu_forward_kernel`` formed it
        z = tl.load(PROJ + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d_z = tl.where(mask, d_act * (cdf + z * pdf), 0.0)
        tl.store(GRAD + offs, _round_bf16(d_z, ROUND_BF16), mask=mask)
        dbias += tl.sum(d_z, axis=0)
    part = DBD_PART + pid.to(tl.int64) * stride_part + cols64
    tl.store(part, tl.load(part, mask=cmask, other=0.0) + dbias, mask=cmask)


@triton.jit
def _ln_backward_kernel(
    DNORMED,  # (m, h) gradient w.r.t. the LayerNorm output (matmul dtype)
    Y, stride_ym, stride_yh,  # chunk of y (strided), re-read to recompute xhat
    MEAN, RSTD,  # (m,) fp32 row statistics saved by the forward kernel
    W,  # (h,) LayerNorm weight
    DY, stride_dym, stride_dyh,  # out: rows of grad_y
    DW_PART, DB_PART,  # (G, h) fp32 per-program partial LayerNorm weight / bias gradients
    stride_part,  # row stride of the partials (one row per program)
    ROW_MASK,  # (m,) uint8: 1 where the row counts (read only if HAS_ROW_MASK)
    DY_SCALE,  # (1,) fp32 factor for the rows of grad_y (read only if HAS_DY_SCALE): undoes d_recon's storage scale
    n_rows, n_cols, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, HAS_ROW_MASK: tl.constexpr, HAS_DY_SCALE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < n_cols
    cols64 = cols.to(tl.int64)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if HAS_DY_SCALE:
        dy_scale = tl.load(DY_SCALE)
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows64[:, None] * n_cols + cols64[None, :]
        dn = tl.load(DNORMED + offs, mask=mask, other=0.0).to(tl.float32)
        ymask = mask
        if HAS_ROW_MASK:  # as in the forward: an excluded row is zeros, its d_normed is 0, so is its dy
            ymask = mask & (tl.load(ROW_MASK + rows64, mask=rmask, other=0) != 0)[:, None]
        # column offsets of y in int32 (the host guarantees (h - 1) * stride_yh < 2**31): int64 ones here
        # make the strided variant spill registers at h = 8192 on sm_90
        yv = tl.load(Y + rows64[:, None] * stride_ym + (cols * stride_yh)[None, :], mask=ymask, other=0.0)
        mean = tl.load(MEAN + rows64, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        # the forward kernel's xhat, recomputed from y with the same fp32 operations
        xhat = tl.where(mask, yv.to(tl.float32) - mean[:, None], 0.0) * rstd[:, None]
        dw += tl.sum(dn * xhat, axis=0)
        db += tl.sum(dn, axis=0)
        dxhat = dn * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / n_cols
        c2 = tl.sum(dxhat, axis=1) / n_cols
        dy = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DY_SCALE:
            dy = dy * dy_scale
        dy_ptrs = DY + rows64[:, None] * stride_dym + cols64[None, :] * stride_dyh
        tl.store(dy_ptrs, _round_bf16(dy, ROUND_BF16), mask=mask)
    part = pid.to(tl.int64) * stride_part + cols64
    tl.store(DW_PART + part, tl.load(DW_PART + part, mask=cmask, other=0.0) + dw, mask=cmask)
    tl.store(DB_PART + part, tl.load(DB_PART + part, mask=cmask, other=0.0) + db, mask=cmask)


# ---------------------------------------------------------------------------------------------------
# Triton host code
# ---------------------------------------------------------------------------------------------------

_MAX_BLOCK = 65536  # widest row (next power of two of h or r) one program holds in registers
_FWD_OVERSUBSCRIBE = 8  # programs per SM for the forward kernels, which keep no partial sums
# Programs per SM for the kernels that keep per-program fp32 partial sums (LN, bias and loss): more than one
# hides latency, at the price of partial rows (3 h + r + 1 floats, each part padded to 32) summed once per call.
_PARTIAL_PROGRAMS_PER_SM = 1
_MAX_WARPS = 16  # widest CTA of the row-wise kernels
# Widest row block read through a column stride other than 1: wider strided chunks are copied to contiguous ones,
# since those kernel variants spill registers with some ptxas versions (Triton 3.6's, sm_90, BLOCK_H 8192); such
# views are rare (the boundary's y and x are contiguous).
_STRIDED_MAX_BLOCK = 4096
# Under TRITON_INTERPRET=1 (read when ``triton.jit`` decorates) the kernels are InterpretedFunctions.
_INTERPRETED = not isinstance(_ln_forward_kernel, JITFunction)


@functools.lru_cache(maxsize=None)
def _num_programs(device_type: str, index: int | None) -> int:
    """The SM count on CUDA; a few programs under the (sequential) interpreter."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count
    return 4


def _tile_settings(block_cols: int, num_rows: int) -> tuple[int, int]:
    """(rows per tile, num_warps): about 4K elements per tile, fewer rows when there are fewer rows."""
    block_m = max(1, min(16, 4096 // block_cols, triton.next_power_of_2(num_rows)))
    elems = block_m * block_cols
    num_warps = 4 if elems < 2048 else 8 if elems < 8192 else 16
    return block_m, min(num_warps, _MAX_WARPS)


@functools.lru_cache(maxsize=None)
def _mm_has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` works for half/bf16 inputs on this device."""
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros((2, 2), dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def _addmm_has_out_dtype_in_place(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)`` writes (``beta=0``, over
    NaNs) or adds (``beta=1``) a ``dtype`` (half/bf16) product (``a`` a transposed view, as ``d_recon.t()``) into an
    fp32 ``acc`` in place, checked on values once."""
    if device_type != "cuda":
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(5, 3, generator=g).to(device=device_type, dtype=dtype)
        b = torch.randn(5, 4, generator=g).to(device=device_type, dtype=dtype)
        acc = torch.full((3, 4), float("nan"), device=device_type)
        product = a.float().t() @ b.float()
        first = torch.addmm(acc, a.t(), b, beta=0, out_dtype=torch.float32, out=acc)
        written = first.data_ptr() == acc.data_ptr() and bool(torch.allclose(acc, product, rtol=1e-4, atol=1e-4))
        torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
        return written and bool(torch.allclose(acc, 2 * product, rtol=1e-4, atol=1e-4))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc += a @ b`` with an fp32 ``acc``, or ``acc = a @ b`` for the ``first`` chunk (``acc`` uninitialised:
    beta = 0 ignores it, so no zero fill): fp32 accumulation inside the matmul where possible, and straight into
    ``acc`` (no ``h x r`` temporary) where the runtime supports it."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif _addmm_has_out_dtype_in_place(a.device.type, a.dtype):
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    else:  # the product in a temporary: fp32 where the runtime has it, else rounded once to the matmul dtype
        product = torch.mm(a, b, out_dtype=acc.dtype) if _mm_has_out_dtype(a.device.type) else torch.mm(a, b)
        acc.copy_(product) if first else acc.add_(product)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, a no-op context otherwise.

    Triton launches on the *current* CUDA device and its current stream, while torch's allocations and
    cuBLAS matmuls follow the tensors: with the block on another GPU (``device_map="auto"``) an unguarded
    launch would read that GPU's memory from the current one (an illegal access) or race the matmuls on
    another stream. Liger-Kernel guards its launches the same way.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _triton_loss_and_grads(y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted,
                           param_scale=1.0):
    """Chunked fused implementation: Triton kernels for the row-wise work, torch matmuls in between;
    every launch runs with ``y``'s device current."""
    with _device_guard(y2.device):
        return _triton_chunks(y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted,
                              param_scale)


def _triton_chunks(y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale=1.0):
    norm_w, norm_b, down_w, down_b, up_w, up_b = params
    device = y2.device
    if device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter, but the kernels were "
            "compiled for a GPU: set TRITON_INTERPRET=1 before importing triton (and lopt_kernels)."
        )
    n, h = y2.shape
    r = down_w.shape[0]
    block_h, block_r = triton.next_power_of_2(h), triton.next_power_of_2(r)
    if max(block_h, block_r) > _MAX_BLOCK:
        raise ValueError(f"reconstruction loss: hidden size {h} / bottleneck {r} too large for the Triton kernels")
    mm_dtype = down_w.dtype
    round_mm = _INTERPRETED and mm_dtype == torch.bfloat16
    round_y = _INTERPRETED and y2.dtype == torch.bfloat16
    f32 = torch.float32
    sms = _num_programs(device.type, device.index)
    progs = sms * _PARTIAL_PROGRAMS_PER_SM  # programs (and partial-sum rows) of the kernels that keep partials
    chunk = min(chunk_rows, n)
    bm_h, warps_h = _tile_settings(block_h, n)
    bm_r, warps_r = _tile_settings(block_r, n)
    norm_w_c, norm_b_c, down_b_c, up_b_c = (t.contiguous() for t in (norm_w, norm_b, down_b, up_b))

    normed = torch.empty((chunk, h), dtype=mm_dtype, device=device)
    proj = torch.empty((chunk, r), dtype=mm_dtype, device=device)  # z without bias, kept for the GELU backward
    act = torch.empty((chunk, r), dtype=mm_dtype, device=device)  # gelu(z), later d_act -> d_z
    recon = torch.empty((chunk, h), dtype=mm_dtype, device=device)  # recon -> d_recon -> d_normed
    # Per-program fp32 partial sums, one row per program, zeroed by one fill: with gradients
    # [LN weight | LN bias | up bias | down bias | loss], each segment starting on a 128-byte boundary.
    seg_h, seg_r = _round_up(h, 32), _round_up(r, 32)
    loss_col = 3 * seg_h + seg_r if compute_grads else 0
    stride_part = loss_col + 32 if compute_grads else 1
    partials = torch.zeros((progs, stride_part), dtype=f32, device=device)
    loss_part = partials[:, loss_col:]
    if compute_grads:
        part_h = [partials[:, i * seg_h :] for i in range(3)]  # LN weight, LN bias, up bias
        part_r = partials[:, 3 * seg_h :]  # down bias
        mean = torch.empty((chunk,), dtype=f32, device=device)
        rstd = torch.empty((chunk,), dtype=f32, device=device)
        grad_y = torch.empty((n, h), dtype=y2.dtype, device=device)
        # written by the first chunk's weight-gradient matmuls (beta = 0), accumulated into by the others
        acc_up = torch.empty((h, r), dtype=f32, device=device)
        acc_down = torch.empty((r, h), dtype=f32, device=device)
        if isinstance(grad_scale, torch.Tensor):
            coef = grad_scale.to(device=device, dtype=f32).reshape(1) * (2.0 / (counted * h))
        elif isinstance(counted, torch.Tensor):
            coef = (2.0 * float(grad_scale) / h) / counted.reshape(1)
        else:
            coef = torch.full((1,), 2.0 * float(grad_scale) / (counted * h), dtype=f32, device=device)
    else:  # placeholders for pointers the disabled (constexpr) branches never touch
        mean = rstd = part_r = coef = loss_part
        part_h = (loss_part,) * 3
    # fp16 matmuls: d_recon = coef * (recon - x) with coef ~ 2 / (N h) would sit in fp16's subnormals (precision
    # lost). coef = mantissa * 2^exponent (on the device): d_recon is stored with the mantissa alone, everything
    # downstream of it carries 2^-exponent, and the LN backward (grad_y) and the final parameter gradients multiply
    # 2^exponent back in, exactly.
    rescale = compute_grads and mm_dtype == torch.float16
    dy_scale = loss_part  # placeholder unless rescale
    if rescale:
        coef, exponent = torch.frexp(coef)
        dy_scale = torch.ldexp(torch.ones_like(coef), exponent)

    has_mask = row_mask is not None
    mask_bytes = row_mask.view(torch.uint8) if has_mask else loss_part  # else a placeholder pointer
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        yc, xc = y2[start : start + m], x2[start : start + m]
        mask_c = mask_bytes[start : start + m] if has_mask else mask_bytes
        if block_h > _STRIDED_MAX_BLOCK:
            yc = yc if yc.stride(1) == 1 else yc.contiguous()
            xc = xc if xc.stride(1) == 1 else xc.contiguous()
        normed_c, proj_c, act_c, recon_c = normed[:m], proj[:m], act[:m], recon[:m]
        # kernels with per-program partial sums: at most ``progs`` programs (a persistent grid, as Liger's
        # layer_norm backward); the purely row-wise forward kernels oversubscribe the SMs instead
        grid_h = min(progs, triton.cdiv(m, bm_h))
        grid_r = min(progs, triton.cdiv(m, bm_r))
        grid_h_fwd = min(_FWD_OVERSUBSCRIBE * sms, triton.cdiv(m, bm_h))
        grid_r_fwd = min(_FWD_OVERSUBSCRIBE * sms, triton.cdiv(m, bm_r))

        _ln_forward_kernel[(grid_h_fwd,)](
            yc, yc.stride(0), yc.stride(1), norm_w_c, norm_b_c, normed_c, mean, rstd, mask_c, m, h, eps, grid_h_fwd,
            BLOCK_M=bm_h, BLOCK_H=block_h, STORE_BWD=compute_grads, HAS_ROW_MASK=has_mask, ROUND_BF16=round_mm,
            num_warps=warps_h,
        )
        torch.mm(normed_c, down_w.t(), out=proj_c)
        _bias_gelu_forward_kernel[(grid_r_fwd,)](
            proj_c, down_b_c, act_c, m, r, grid_r_fwd,
            BLOCK_M=bm_r, BLOCK_R=block_r, ROUND_BF16=round_mm, num_warps=warps_r,
        )
        torch.mm(act_c, up_w.t(), out=recon_c)
        _squared_error_kernel[(grid_h,)](
            recon_c, up_b_c, xc, xc.stride(0), xc.stride(1), coef, mask_c, loss_part, part_h[2], stride_part, m, h,
            grid_h,
            BLOCK_M=bm_h, BLOCK_H=block_h, COMPUTE_GRADS=compute_grads, HAS_ROW_MASK=has_mask,
            ROUND_BF16=round_mm, num_warps=warps_h,
        )
        if not compute_grads:
            continue
        d_recon = recon_c
        _accumulate_mm(acc_up, d_recon.t(), act_c, first=start == 0)
        d_z = torch.mm(d_recon, up_w, out=act_c)  # d_act (act is spent), turned into d_z in place below
        _gelu_backward_kernel[(grid_r,)](
            d_z, proj_c, down_b_c, part_r, stride_part, m, r, grid_r,
            BLOCK_M=bm_r, BLOCK_R=block_r, ROUND_BF16=round_mm, num_warps=warps_r,
        )
        _accumulate_mm(acc_down, d_z.t(), normed_c, first=start == 0)
        d_normed = torch.mm(d_z, down_w, out=recon_c)
        gy = grad_y[start : start + m]
        # the LN backward indexes y's columns in int32; a (pathological) column stride that overflows it
        # gets a contiguous copy of the chunk instead
        yb = yc if (h - 1) * yc.stride(1) < 2**31 else yc.contiguous()
        _ln_backward_kernel[(grid_h,)](
            d_normed, yb, yb.stride(0), yb.stride(1), mean, rstd, norm_w_c, gy, gy.stride(0), gy.stride(1),
            part_h[0], part_h[1], stride_part, mask_c, dy_scale, m, h, grid_h,
            BLOCK_M=bm_h, BLOCK_H=block_h, HAS_ROW_MASK=has_mask, HAS_DY_SCALE=rescale, ROUND_BF16=round_y,
            num_warps=warps_h,
        )

    # the chunk buffers and their views: freed before the sums are allocated
    normed = proj = act = recon = mean = rstd = normed_c = proj_c = act_c = recon_c = d_recon = d_z = d_normed = None
    if not compute_grads:
        return loss_part.sum() / (counted * h), None
    # Finishing in three launches: one sum over the programs' partial rows, the loss, and one multi-tensor copy
    # that casts every gradient to the parameters' dtype (fp32 accumulators are returned as they are).
    sums = partials.sum(0)
    loss = sums[loss_col] / (counted * h)
    if rescale:  # the storage scale and param_scale, in fp32 before the cast to the parameters' dtype
        torch._foreach_mul_([sums, acc_up, acc_down], (dy_scale * param_scale).reshape(()))
    elif param_scale != 1.0:  # in fp32, before the cast to the parameters' dtype (one launch)
        torch._foreach_mul_([sums, acc_up, acc_down], param_scale)
    sources = (sums[:h], sums[seg_h : seg_h + h], acc_down, sums[3 * seg_h : 3 * seg_h + r], acc_up,
               sums[2 * seg_h : 2 * seg_h + h])  # in the parameters' order
    grads, copy_to, copy_from = [], [], []
    for src, param in zip(sources, params):
        if param.dtype == f32 and (src is acc_up or src is acc_down):  # a whole buffer of its own: returned as is
            grads.append(src)
            continue
        grads.append(torch.empty(param.shape, dtype=param.dtype, device=device))
        copy_to.append(grads[-1])
        copy_from.append(src)
    torch._foreach_copy_(copy_to, copy_from)
    return loss, (grad_y, *grads)


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile; fake implementations for FakeTensor tracing)
# ---------------------------------------------------------------------------------------------------


def _run_impl(y, x, params, eps, grad_scale, compute_grads, backend, chunk_rows, row_mask=None, param_scale=1.0):
    h = y.shape[-1]
    y2 = y.reshape(-1, h)  # a view whenever the strides allow: the kernels take row/column strides
    x2 = x.reshape(-1, h)
    if row_mask is None:
        counted = y2.shape[0]
    else:  # the loss is the mean over the counted rows; over none it is 0 (the count stays on the device)
        row_mask = row_mask.reshape(-1).contiguous()
        counted = row_mask.sum(dtype=torch.float32).clamp_min(1.0)
    # The op fixes its own precision (fp32 statistics and accumulation): an enclosing autocast
    # region must not recast its matmuls.
    with torch.autocast(y.device.type, enabled=False):
        if backend == "triton":
            loss, grads = _triton_loss_and_grads(
                y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale)
        else:
            loss, grads = _torch_loss_and_grads(
                y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale)
    if grads is not None:
        grads = (grads[0].reshape(y.shape), *grads[1:])
    return loss, grads


@torch.library.custom_op(
    "lopt_kernels::reconstruction_loss",
    mutates_args=(),
    schema=(
        "(Tensor y, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor down_weight, Tensor down_bias, "
        "Tensor up_weight, Tensor up_bias, float eps, str backend, int chunk_rows, Tensor? row_mask) -> Tensor"
    ),
)
def _loss_op(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows, row_mask,
):
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    loss, _ = _run_impl(y, x, params, eps, 1.0, False, backend, chunk_rows, row_mask)
    return loss


@_loss_op.register_fake
def _loss_op_fake(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows, row_mask,
):
    return y.new_empty((), dtype=torch.float32)


@torch.library.custom_op(
    "lopt_kernels::reconstruction_loss_and_grads",
    mutates_args=(),
    schema=(
        "(Tensor y, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor down_weight, Tensor down_bias, "
        "Tensor up_weight, Tensor up_bias, float eps, float grad_scale, Tensor? grad_scale_tensor, str backend, "
        "int chunk_rows, Tensor? row_mask, float param_grad_scale=1.0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _loss_and_grads_op(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, grad_scale, grad_scale_tensor,
    backend, chunk_rows, row_mask, param_grad_scale=1.0,
):
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    scale = grad_scale_tensor if grad_scale_tensor is not None else grad_scale
    loss, grads = _run_impl(y, x, params, eps, scale, True, backend, chunk_rows, row_mask, param_grad_scale)
    return (loss, *grads)


@_loss_and_grads_op.register_fake
def _loss_and_grads_op_fake(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, grad_scale, grad_scale_tensor,
    backend, chunk_rows, row_mask, param_grad_scale=1.0,
):
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    return (y.new_empty((), dtype=torch.float32), y.new_empty(y.shape), *(p.new_empty(p.shape) for p in params))


def _matmul_flops(y_shape, down_weight_shape) -> int:
    """2 * rows * h * r: one of the aux head's two projections over every row."""
    rows = math.prod(y_shape[:-1])
    r, h = down_weight_shape
    return 2 * rows * h * r


# FLOP counts (torch.utils.flop_counter) for the custom ops, which the counter would otherwise see as zero:
# the forward is two projections; the gradients add four more (two weight gradients, two input gradients).
@flop_counter.register_flop_formula(torch.ops.lopt_kernels.reconstruction_loss)
def _loss_op_flops(y_shape, x_shape, nw, nb, down_weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _matmul_flops(y_shape, down_weight_shape)


@flop_counter.register_flop_formula(torch.ops.lopt_kernels.reconstruction_loss_and_grads)
def _loss_and_grads_op_flops(y_shape, x_shape, nw, nb, down_weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 6 * _matmul_flops(y_shape, down_weight_shape)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def reconstruction_loss_and_grads(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
    eps: float = 1e-5, grad_scale=1.0, compute_grads: bool = True, backend: str = "auto",
    chunk_rows: int | None = None, row_mask: torch.Tensor | None = None, param_grad_scale: float = 1.0,
):
    """Loss (fp32 scalar) and, if ``compute_grads``, the gradients of ``grad_scale * loss``.

    ``param_grad_scale`` multiplies the six parameter gradients (not ``grad_y``) in fp32 before their cast to the
    parameters' dtype: a caller that scales the loss up for ``grad_y``'s sake (fp16 activations) scales them back
    there, where the fp16 cast would overflow.

    ``row_mask`` (bool, ``y.shape[:-1]``, on ``y``'s device) restricts the loss to the rows where it is true:
    the mean over those rows (0 over none), every gradient zero on the others, with no gather and no host sync.

    Returns ``(loss, grads)`` with ``grads = (grad_y, grad_norm_weight, grad_norm_bias, grad_down_weight,
    grad_down_bias, grad_up_weight, grad_up_bias)`` (``grad_y`` shaped like ``y`` in ``y.dtype``, parameter
    gradients in the parameters' dtype), or ``None`` when ``compute_grads`` is false. ``grad_scale`` is a
    float or a 0-d tensor (read on the device, no host sync). The results are plain tensors outside the
    autograd graph; use :func:`reconstruction_loss` for a differentiable loss.
    """
    params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    check_reconstruction_inputs(y, x, *params)
    check_row_mask(row_mask, y)
    impl = resolve_backend(backend, y.device)
    h = y.shape[-1]
    n = math.prod(y.shape[:-1])
    if n == 0 or h == 0:
        raise ValueError(f"reconstruction loss: y {tuple(y.shape)} is empty (no rows or no hidden features)")
    if down_weight.shape[0] == 0:
        raise ValueError(f"reconstruction loss: the decoder's bottleneck is empty (down_weight {tuple(down_weight.shape)})")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)):
        raise ValueError(f"reconstruction loss: chunk_rows must be an int or None, got {chunk_rows!r}")
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(n, h, down_weight.shape[0])
    if chunk < 1:
        raise ValueError(f"reconstruction loss: chunk_rows must be >= 1, got {chunk}")
    if isinstance(grad_scale, torch.Tensor) and grad_scale.numel() != 1:
        raise ValueError(f"reconstruction loss: grad_scale must be a float or a one-element tensor, got shape "
                         f"{tuple(grad_scale.shape)}")
    with torch.no_grad():
        if not compute_grads:
            return torch.ops.lopt_kernels.reconstruction_loss(
                y, x, *params, float(eps), impl, int(chunk), row_mask), None
        if isinstance(grad_scale, torch.Tensor):
            scale, scale_tensor = 1.0, grad_scale.detach().to(device=y.device, dtype=torch.float32)
        else:
            scale, scale_tensor = float(grad_scale), None
        loss, *grads = torch.ops.lopt_kernels.reconstruction_loss_and_grads(
            y, x, *params, float(eps), scale, scale_tensor, impl, int(chunk), row_mask, float(param_grad_scale)
        )
    return loss, tuple(grads)


class ReconstructionLossFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed during the forward and scaled by the incoming gradient.

    The backward scales the saved gradients in place, so the graph supports one backward pass only.
    """

    @staticmethod
    def forward(ctx, y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows,
                row_mask):
        params = (norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
        needs = ctx.needs_input_grad
        compute = needs[0] or any(needs[2:8])
        loss, grads = reconstruction_loss_and_grads(
            y, x, *params, eps=eps, compute_grads=compute, backend=backend, chunk_rows=chunk_rows, row_mask=row_mask
        )
        if compute:
            ctx.save_for_backward(*grads)
        ctx.computed = compute
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the precomputed gradients have no graph of their own
            raise RuntimeError(
                "lopt_kernels: the fused reconstruction loss cannot be differentiated twice (create_graph=True, e.g. a "
                "gradient penalty): its gradients are computed in its forward, without a graph. Use the unfused "
                "PyTorch expression of the loss for higher-order gradients."
            )
        if not ctx.computed:
            return (None,) * 12
        grad_y, *param_grads = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # Scaled in place (a 0-d fp32 multiplier keeps each tensor's dtype, one rounding): no second
        # y-sized buffer. A second backward through the same graph (retain_graph=True) therefore raises
        # autograd's "modified by an inplace operation" error instead of returning rescaled gradients.
        scaled_y = grad_y.mul_(grad_loss) if needs[0] else None
        scaled = [g.mul_(grad_loss) if needs[2 + i] else None for i, g in enumerate(param_grads)]
        return (scaled_y, None, *scaled, None, None, None, None)


def reconstruction_loss(
    y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
    eps: float = 1e-5, backend: str = "auto", chunk_rows: int | None = None, row_mask: torch.Tensor | None = None,
):
    """Differentiable fused reconstruction loss (fp32 scalar). The target ``x`` receives no gradient.
    ``row_mask`` as in :func:`reconstruction_loss_and_grads`.

    Without grad mode or with no input requiring grad, only the loss is computed (no backward work).
    """
    differentiable = (y, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias)
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in differentiable):
        return ReconstructionLossFunction.apply(
            y, x.detach(), norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, eps, backend, chunk_rows,
            row_mask,
        )
    loss, _ = reconstruction_loss_and_grads(
        y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias,
        eps=eps, compute_grads=False, backend=backend, chunk_rows=chunk_rows, row_mask=row_mask,
    )
    return loss
