"""Host code of the Triton path: chunking, buffers, launches and the weight-gradient matmuls.

Triton path, per chunk of ``m`` rows (modelled on Liger-Kernel's fused linear cross-entropy; the
matmuls run through torch in the decoder's dtype, the row-wise work runs in Triton in fp32):

1. ``ln_forward_kernel`` reads the chunk of ``y`` once and writes the normalised rows in the matmul
   dtype, plus (only when gradients are wanted) the row ``mean`` and ``rstd`` in fp32 (8 bytes a row);
   no fp32 ``xhat`` is kept: the LayerNorm backward re-reads ``y`` and recomputes it;
2. ``proj = normed @ W_down^T`` (torch), then ``bias_gelu_forward_kernel`` adds the bias in fp32,
   applies the exact erf GELU and writes ``act`` in the matmul dtype; ``proj`` is kept, so no fp32 ``z``
   is stored: the GELU backward recomputes ``z = proj + b_down`` in fp32 (bitwise the forward's ``z``);
3. ``recon = act @ W_up^T`` (torch), then ``squared_error_kernel`` adds the up bias, subtracts ``x``
   (read strided, no copy), accumulates the chunk's loss into per-program fp32 partials and overwrites
   ``recon`` in place with ``d_recon = 2 * grad_scale / (N * h) * (recon - x)``, accumulating the up-bias
   gradient in per-program fp32 partials (the Liger layer_norm scheme);
4. backward: ``dW_up += d_recon^T @ act``; ``d_act = d_recon @ W_up`` (into the ``act`` buffer, which is
   spent); ``gelu_backward_kernel`` reads ``proj`` and turns ``d_act`` in place into
   ``d_z = d_act * gelu'(z)`` with the down-bias partials; ``dW_down += d_z^T @ normed``;
   ``d_normed = d_z @ W_down`` (into the ``recon`` buffer); ``ln_backward_kernel`` re-reads the chunk of
   ``y`` (strided), recomputes ``xhat = (y - mean) * rstd`` and writes the rows of ``grad_y`` and the
   LayerNorm weight/bias partials.

The host code runs under ``torch.cuda.device(y.device)`` (``_device_guard``): Triton launches on the
current CUDA device, so a block on another GPU (``device_map="auto"``) gets its kernels on its own device
and stream, where its matmuls run.

Weight gradients accumulate across chunks in fp32 buffers: straight into them with
``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` where the runtime supports it (a probe checks it on
values once per device type), else through an fp32 ``torch.mm(..., out_dtype=float32)`` temporary, else
(CPU; CUDA torch without out_dtype) each chunk's product is rounded once to the matmul dtype before the fp32
accumulation (fp16: formed in fp32, as the scaled fp16 d_recon's row sums can overflow fp16); the first chunk
writes them (``beta=0``: no zero fill). Launches besides the chunks' (5 Triton kernels, 6 matmuls each) are five
per call: one fill of all per-program partials, the gradient coefficient, one sum of the partial rows, the loss, and
one multi-tensor copy that casts every gradient to the parameters' dtype. Chunk buffers (two ``m x h`` and two
``m x r`` in the matmul dtype, two fp32 row statistics when gradients are wanted) are the only working memory
besides ``grad_y`` itself.
``compute_grads=False`` launches the forward kernels only, without the ``mean``/``rstd`` stores. With fp16
matmuls, ``d_recon`` is stored times a power of two (on the device) that keeps it out of fp16's subnormals and, for
any fp16 recon and x, below fp16's largest value; the LayerNorm backward and the final parameter gradients divide it
out exactly.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from .gemm_kernels import act_grad_kernel, down_gelu_kernel, ln_grad_kernel, up_error_kernel
from .kernels import (
    INTERPRETED,
    bias_gelu_forward_kernel,
    gelu_backward_kernel,
    ln_backward_kernel,
    ln_forward_kernel,
    squared_error_kernel,
)
from .request import LossRequest

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
    else:  # the product in a temporary: fp32 where the runtime has it, else rounded once to the matmul dtype (not fp16)
        if _mm_has_out_dtype(a.device.type):
            product = torch.mm(a, b, out_dtype=acc.dtype)
        elif a.dtype == torch.float16:
            # fp16 d_recon / d_z carry the storage scale 2^-exponent of ``coef`` (``_gradient_coefficient``): a chunk's
            # row sum can pass fp16's 65504 although the gradient it becomes is small, so no fp16 rounding here
            product = torch.mm(a.float(), b.float())
        else:
            product = torch.mm(a, b)
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


def triton_loss_and_grads(request: LossRequest):
    """Chunked fused implementation of a ``LossRequest``: Triton kernels for the row-wise work (in GEMM epilogues on
    the ``"triton"`` matmul path), every launch with ``y``'s device current."""
    chunks = _triton_gemm_chunks if gemm_path() == "triton" else _triton_chunks
    with _device_guard(request.y.device):
        return chunks(request)


GEMM_PATHS = ("cublas", "triton")


def gemm_path() -> str:
    """Which matmuls the Triton backend runs: ``"cublas"`` (the default: torch matmuls between row kernels) or
    ``"triton"`` (four of the six as Triton GEMMs with the row-wise work in their epilogues, ``gemm_kernels``), from
    the environment variable ``LOPT_RECON_GEMMS``, read per call so a benchmark can time both in one process."""
    path = os.environ.get("LOPT_RECON_GEMMS", "cublas")
    if path not in GEMM_PATHS:
        raise ValueError(f"LOPT_RECON_GEMMS must be one of {GEMM_PATHS}, got {path!r}")
    return path


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of each epilogue GEMM on CUDA for 16-bit operands. The backward
# two keep 64-column tiles: their epilogues hold several fp32 tiles beside the accumulator (proj, d_z; y, xhat,
# d_normed); with 4 warps they spilled on sm_90. fp32 operands (IEEE products, no tensor-core speed to keep) take
# 64 x 64 x 32 tiles on 8 warps: larger tiles, or 4 warps (Triton 3.6), spilled.
_GEMM_CONFIGS = {
    "down_gelu": (128, 128, 64, 8, 3),
    "up_error": (128, 128, 64, 8, 3),
    "act_grad": (128, 64, 64, 8, 3),
    "ln_grad": (128, 64, 64, 8, 3),
}
_GEMM_CONFIG_FP32 = (64, 64, 32, 8, 3)
# Under the interpreter: small tiles, so the tests' odd shapes cross tile edges in every dimension (several column
# tiles of r for the row terms, K tails, partial row tiles).
_GEMM_CONFIG_INTERPRETED = (16, 16, 16, 1, 1)
_GROUP_M = 8  # row tiles per group in the launch order (each weight tile read from L2 by a group)


def _gemm_config(kernel: str, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    if INTERPRETED:
        return _GEMM_CONFIG_INTERPRETED
    return _GEMM_CONFIG_FP32 if dtype == torch.float32 else _GEMM_CONFIGS[kernel]


def _gemm_launch(kernel, name, m, n, dtype, precision, *args, **constexprs) -> None:
    """Launch one epilogue GEMM over an ``m x n`` output with the tile config of ``name``."""
    block_m, block_n, block_k, warps, stages = _gemm_config(name, dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M, DOT_FP32=INTERPRETED,
                 INPUT_PRECISION=precision, num_warps=warps, num_stages=stages, **constexprs)


def _triton_gemm_chunks(request: LossRequest):
    """The ``"triton"`` GEMM path: per chunk the LayerNorm forward kernel, four epilogue GEMMs (``gemm_kernels``) and
    the two weight-gradient matmuls on cuBLAS. Neither the reconstruction, ``d_act`` nor ``d_normed`` is stored."""
    y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale = request.fields()
    norm_w, norm_b, down_w, down_b, up_w, up_b = params
    device = y2.device
    _require_interpreter_or_cuda(device)
    n, h = y2.shape
    r = down_w.shape[0]
    block_h = triton.next_power_of_2(h)
    if block_h > _MAX_BLOCK:
        raise ValueError(f"reconstruction loss: hidden size {h} too large for the Triton kernels")
    mm_dtype = down_w.dtype
    round_mm = INTERPRETED and mm_dtype == torch.bfloat16
    round_y = INTERPRETED and y2.dtype == torch.bfloat16
    # fp32 operands: IEEE products unless the user allows TF32 for matmuls (as cuBLAS follows the same flag)
    precision = "tf32" if mm_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    f32 = torch.float32
    chunk = min(chunk_rows, n)
    bm_h, warps_h = _tile_settings(block_h, n)
    norm_w_c, norm_b_c, down_b_c, up_b_c = (t.contiguous() for t in (norm_w, norm_b, down_b, up_b))

    normed = torch.empty((chunk, h), dtype=mm_dtype, device=device)
    act = torch.empty((chunk, r), dtype=mm_dtype, device=device)  # gelu(z), later d_z
    # Per-row-tile fp32 partial rows, zeroed by one fill: [LN weight | LN bias | up bias | down bias | loss per
    # column tile of h], each segment starting on a 128-byte boundary.
    row_tiles = max(triton.cdiv(chunk, _gemm_config(k, mm_dtype)[0]) for k in _GEMM_CONFIGS)
    loss_tiles = triton.cdiv(h, _gemm_config("up_error", mm_dtype)[1])
    seg_h, seg_r = _round_up(h, 32), _round_up(r, 32)
    loss_col = 3 * seg_h + seg_r if compute_grads else 0
    stride_part = loss_col + _round_up(loss_tiles, 32)
    partials = torch.zeros((row_tiles, stride_part), dtype=f32, device=device)
    if compute_grads:
        proj = torch.empty((chunk, r), dtype=mm_dtype, device=device)  # (w * xhat) @ W_down^T, for the GELU backward
        d_recon = torch.empty((chunk, h), dtype=mm_dtype, device=device)
        term_tiles = triton.cdiv(r, _gemm_config("act_grad", mm_dtype)[1])
        row_terms = torch.empty((term_tiles, 2, chunk), dtype=f32, device=device)
        mean, rstd, grad_y, acc_up, acc_down = _gradient_buffers(n, h, r, chunk, y2.dtype, device)
        coef, dy_scale, rescale = _gradient_coefficient(grad_scale, counted, h, mm_dtype, device)
    else:  # placeholders for pointers the disabled (constexpr) branches never touch
        proj = d_recon = mean = rstd = row_terms = coef = dy_scale = partials
        rescale = False
    down_w, up_w = _int32_indexable(down_w), _int32_indexable(up_w)
    down_w_ln = _down_weight_times_norm_params(down_w, norm_w, norm_b)
    has_mask = row_mask is not None
    for start, m, yc, xc, mask_c in _row_chunks(y2, x2, row_mask, chunk, partials, block_h):
        normed_c, act_c, proj_c, d_recon_c = normed[:m], act[:m], proj[:m], d_recon[:m]
        grid_h_fwd = min(_FWD_OVERSUBSCRIBE * _num_programs(device.type, device.index), triton.cdiv(m, bm_h))
        ln_forward_kernel[(grid_h_fwd,)](
            yc, yc.stride(0), yc.stride(1), norm_w_c, norm_b_c, normed_c, mean, rstd, mask_c, m, h, eps, grid_h_fwd,
            BLOCK_M=bm_h, BLOCK_H=block_h, STORE_BWD=compute_grads, HAS_ROW_MASK=has_mask, ROUND_BF16=round_mm,
            ADD_BIAS=False, num_warps=warps_h,
        )
        _gemm_launch(
            down_gelu_kernel, "down_gelu", m, r, mm_dtype, precision,
            normed_c, down_w, down_w.stride(0), down_w.stride(1), down_b_c, down_w_ln, proj_c, act_c, m, r, h,
            STORE_PROJ=compute_grads, ROUND_BF16=round_mm,
        )
        _gemm_launch(
            up_error_kernel, "up_error", m, h, mm_dtype, precision,
            act_c, up_w, up_w.stride(0), up_w.stride(1), up_b_c, xc, xc.stride(0), xc.stride(1), coef, mask_c,
            d_recon_c, partials, stride_part, loss_col, 2 * seg_h, m, h, r,
            COMPUTE_GRADS=compute_grads, HAS_ROW_MASK=has_mask, ROUND_BF16=round_mm,
        )
        if not compute_grads:
            continue
        _accumulate_mm(acc_up, d_recon_c.t(), act_c, first=start == 0)
        d_z = act_c  # act is spent: d_z takes its place
        _gemm_launch(
            act_grad_kernel, "act_grad", m, r, mm_dtype, precision,
            d_recon_c, up_w, up_w.stride(0), up_w.stride(1), proj_c, down_b_c, down_w_ln, d_z, partials, stride_part,
            3 * seg_h, row_terms, m, r, h,
            ROUND_BF16=round_mm,
        )
        _accumulate_mm(acc_down, d_z.t(), normed_c, first=start == 0)
        gy = grad_y[start : start + m]
        _gemm_launch(
            ln_grad_kernel, "ln_grad", m, h, mm_dtype, precision,
            d_z, down_w, down_w.stride(0), down_w.stride(1), yc, yc.stride(0), yc.stride(1), mean, rstd, norm_w_c,
            row_terms, term_tiles, mask_c, dy_scale, gy, gy.stride(0), gy.stride(1), partials, stride_part, 0, seg_h, m, h, r,
            HAS_ROW_MASK=has_mask, HAS_DY_SCALE=rescale, ROUND_BF16=round_y,
        )
    normed = act = proj = d_recon = normed_c = act_c = proj_c = d_recon_c = d_z = row_terms = None
    return _finish(partials, loss_col, loss_tiles, counted, h, r, seg_h, compute_grads, rescale, dy_scale,
                   param_scale, params, acc_up if compute_grads else None, acc_down if compute_grads else None,
                   grad_y if compute_grads else None, norm_bias_left_out=True)


def _triton_chunks(request: LossRequest):
    y2, x2, params, eps, grad_scale, compute_grads, chunk_rows, row_mask, counted, param_scale = request.fields()
    norm_w, norm_b, down_w, down_b, up_w, up_b = params
    device = y2.device
    _require_interpreter_or_cuda(device)
    n, h = y2.shape
    r = down_w.shape[0]
    block_h, block_r = triton.next_power_of_2(h), triton.next_power_of_2(r)
    if max(block_h, block_r) > _MAX_BLOCK:
        raise ValueError(f"reconstruction loss: hidden size {h} / bottleneck {r} too large for the Triton kernels")
    mm_dtype = down_w.dtype
    round_mm = INTERPRETED and mm_dtype == torch.bfloat16
    round_y = INTERPRETED and y2.dtype == torch.bfloat16
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
        mean, rstd, grad_y, acc_up, acc_down = _gradient_buffers(n, h, r, chunk, y2.dtype, device)
        coef, dy_scale, rescale = _gradient_coefficient(grad_scale, counted, h, mm_dtype, device)
    else:  # placeholders for pointers the disabled (constexpr) branches never touch
        mean = rstd = part_r = coef = dy_scale = loss_part
        part_h = (loss_part,) * 3
        rescale = False

    has_mask = row_mask is not None
    for start, m, yc, xc, mask_c in _row_chunks(y2, x2, row_mask, chunk, loss_part, block_h):
        normed_c, proj_c, act_c, recon_c = normed[:m], proj[:m], act[:m], recon[:m]
        # kernels with per-program partial sums: at most ``progs`` programs (a persistent grid, as Liger's
        # layer_norm backward); the purely row-wise forward kernels oversubscribe the SMs instead
        grid_h = min(progs, triton.cdiv(m, bm_h))
        grid_r = min(progs, triton.cdiv(m, bm_r))
        grid_h_fwd = min(_FWD_OVERSUBSCRIBE * sms, triton.cdiv(m, bm_h))
        grid_r_fwd = min(_FWD_OVERSUBSCRIBE * sms, triton.cdiv(m, bm_r))

        ln_forward_kernel[(grid_h_fwd,)](
            yc, yc.stride(0), yc.stride(1), norm_w_c, norm_b_c, normed_c, mean, rstd, mask_c, m, h, eps, grid_h_fwd,
            BLOCK_M=bm_h, BLOCK_H=block_h, STORE_BWD=compute_grads, HAS_ROW_MASK=has_mask, ROUND_BF16=round_mm,
            num_warps=warps_h,
        )
        torch.mm(normed_c, down_w.t(), out=proj_c)
        bias_gelu_forward_kernel[(grid_r_fwd,)](
            proj_c, down_b_c, act_c, m, r, grid_r_fwd,
            BLOCK_M=bm_r, BLOCK_R=block_r, ROUND_BF16=round_mm, num_warps=warps_r,
        )
        torch.mm(act_c, up_w.t(), out=recon_c)
        squared_error_kernel[(grid_h,)](
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
        gelu_backward_kernel[(grid_r,)](
            d_z, proj_c, down_b_c, part_r, stride_part, m, r, grid_r,
            BLOCK_M=bm_r, BLOCK_R=block_r, ROUND_BF16=round_mm, num_warps=warps_r,
        )
        _accumulate_mm(acc_down, d_z.t(), normed_c, first=start == 0)
        d_normed = torch.mm(d_z, down_w, out=recon_c)
        gy = grad_y[start : start + m]
        ln_backward_kernel[(grid_h,)](
            d_normed, yc, yc.stride(0), yc.stride(1), mean, rstd, norm_w_c, gy, gy.stride(0), gy.stride(1),
            part_h[0], part_h[1], stride_part, mask_c, dy_scale, m, h, grid_h,
            BLOCK_M=bm_h, BLOCK_H=block_h, HAS_ROW_MASK=has_mask, HAS_DY_SCALE=rescale, ROUND_BF16=round_y,
            num_warps=warps_h,
        )

    # the chunk buffers and their views: freed before the sums are allocated
    normed = proj = act = recon = mean = rstd = normed_c = proj_c = act_c = recon_c = d_recon = d_z = d_normed = None
    return _finish(partials, loss_col, 1, counted, h, r, seg_h, compute_grads, rescale, dy_scale,
                   param_scale, params, acc_up if compute_grads else None, acc_down if compute_grads else None,
                   grad_y if compute_grads else None)


def _down_weight_times_norm_params(down_w, norm_w, norm_b) -> torch.Tensor:
    """``(r, 2)`` fp32 ``W_down @ [w, b]`` (LayerNorm weight and bias): the LayerNorm backward's row terms become sums
    over r (``gemm_kernels``' docstring). Two launches where the matmul has ``out_dtype`` or runs in fp32."""
    norm_params = torch.stack((norm_w, norm_b), 1)  # the parameters share one dtype (check_reconstruction_inputs)
    if down_w.dtype == torch.float32:
        return torch.mm(down_w, norm_params)
    if _mm_has_out_dtype(down_w.device.type):
        return torch.mm(down_w, norm_params, out_dtype=torch.float32)
    return torch.mm(down_w.float(), norm_params.float())


def _row_chunks(y2, x2, row_mask, chunk, placeholder, block_h):
    """``(start, rows, y rows, x rows, row-mask bytes)`` of each chunk; the mask is ``placeholder`` (a pointer the
    kernels never read) without a row mask. A chunk of y or x is copied contiguous where its column stride is not 1
    and its rows are wider than ``_STRIDED_MAX_BLOCK`` (those strided kernel variants spilled registers), or where
    its column offsets overflow int32 (some kernels index columns in int32; only a pathological view gets there)."""
    mask_bytes = row_mask.view(torch.uint8) if row_mask is not None else None
    h = y2.shape[1]

    def kernel_ready(rows):
        if rows.stride(1) != 1 and (block_h > _STRIDED_MAX_BLOCK or (h - 1) * rows.stride(1) >= 2**31):
            return rows.contiguous()
        return rows

    for start in range(0, y2.shape[0], chunk):
        m = min(chunk, y2.shape[0] - start)
        yc, xc = kernel_ready(y2[start : start + m]), kernel_ready(x2[start : start + m])
        yield start, m, yc, xc, (mask_bytes[start : start + m] if mask_bytes is not None else placeholder)


def _int32_indexable(weight: torch.Tensor) -> torch.Tensor:
    """``weight``, or a contiguous copy where its element offsets overflow int32 (the GEMMs index weights in int32;
    only an odd view, such as a slice of a huge fused tensor, gets there)."""
    last = sum((size - 1) * stride for size, stride in zip(weight.shape, weight.stride()))
    return weight if last < 2**31 else weight.contiguous()


def _require_interpreter_or_cuda(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter, but the kernels were "
            "compiled for a GPU: set TRITON_INTERPRET=1 before importing triton (and lopt_kernels)."
        )


def _gradient_buffers(n, h, r, chunk, y_dtype, device):
    """``(mean, rstd, grad_y, acc_up, acc_down)``: a chunk's fp32 row statistics, ``grad_y`` (n x h, y's dtype) and the
    fp32 weight-gradient accumulators, uninitialised: the first chunk's matmuls write them (beta = 0)."""
    f32 = torch.float32
    return (torch.empty((chunk,), dtype=f32, device=device), torch.empty((chunk,), dtype=f32, device=device),
            torch.empty((n, h), dtype=y_dtype, device=device), torch.empty((h, r), dtype=f32, device=device),
            torch.empty((r, h), dtype=f32, device=device))


def _gradient_coefficient(grad_scale, counted, h, mm_dtype, device):
    """``(coef, dy_scale, rescale)``: ``coef = 2 * grad_scale / (counted * h)`` as a (1,) fp32 device tensor (no host
    sync for a tensor ``grad_scale`` or ``counted``).

    fp16 matmuls: ``d_recon = coef * (recon - x)`` with ``coef ~ 2 / (N h)`` would sit in fp16's subnormals (precision
    lost). ``coef = mantissa * 2^exponent`` (on the device) with the mantissa in [1/8, 1/4): d_recon is stored with the
    mantissa alone, everything downstream of it carries ``2^-exponent``, and the LN backward (grad_y) and the final
    parameter gradients multiply ``dy_scale = 2^exponent`` back in, exactly (``rescale``). The fp32 ``recon - x``
    (recon, its bias and x each fp16) is below 3 x 65504 in magnitude, so its product with a mantissa below 1/4 stays
    within fp16's range: frexp's [1/2, 1) mantissa let a difference beyond 65504 / mantissa (~9e4 at 0.73) round
    to inf, where the true d_recon is small (the grad scale and 1 / (N h) are in the exponent)."""
    f32 = torch.float32
    if isinstance(grad_scale, torch.Tensor):
        coef = grad_scale.to(device=device, dtype=f32).reshape(1) * (2.0 / (counted * h))
    elif isinstance(counted, torch.Tensor):
        coef = (2.0 * float(grad_scale) / h) / counted.reshape(1)
    else:
        coef = torch.full((1,), 2.0 * float(grad_scale) / (counted * h), dtype=f32, device=device)
    if mm_dtype != torch.float16:
        return coef, coef, False  # dy_scale: a placeholder pointer
    coef, exponent = torch.frexp(coef)
    return coef * 0.25, torch.ldexp(torch.ones_like(coef), exponent + 2), True


def _finish(partials, loss_col, loss_tiles, counted, h, r, seg_h, compute_grads, rescale, dy_scale, param_scale,
            params, acc_up, acc_down, grad_y, norm_bias_left_out=False):
    """The loss and the gradients in the parameters' dtypes from the partial rows ``[LN weight | LN bias | up bias |
    down bias | ``loss_tiles`` loss columns]`` and the fp32 weight-gradient accumulators. ``norm_bias_left_out``:
    ``acc_down`` was accumulated against ``w * xhat``, so it lacks ``outer(down-bias gradient, LN bias)``."""
    device = partials.device
    if not compute_grads:
        return partials.sum() / (counted * h), None
    # Three launches: one sum over the partial rows, the loss, and one multi-tensor copy that casts every gradient
    # to the parameters' dtype (fp32 accumulators are returned as they are).
    sums = partials.sum(0)
    if norm_bias_left_out:  # before any scaling: the down-bias sums carry the same scale as acc_down
        acc_down.addr_(sums[3 * seg_h : 3 * seg_h + r], params[1].float())
    loss = (sums[loss_col] if loss_tiles == 1 else sums[loss_col : loss_col + loss_tiles].sum()) / (counted * h)
    if rescale:  # the storage scale and param_scale, in fp32 before the cast to the parameters' dtype
        torch._foreach_mul_([sums, acc_up, acc_down], (dy_scale * param_scale).reshape(()))
    elif param_scale != 1.0:  # in fp32, before the cast to the parameters' dtype (one launch)
        torch._foreach_mul_([sums, acc_up, acc_down], param_scale)
    sources = (sums[:h], sums[seg_h : seg_h + h], acc_down, sums[3 * seg_h : 3 * seg_h + r], acc_up,
               sums[2 * seg_h : 2 * seg_h + h])  # in the parameters' order
    grads, copy_to, copy_from = [], [], []
    for src, param in zip(sources, params):
        if param.dtype == torch.float32 and (src is acc_up or src is acc_down):  # a buffer of its own: returned as is
            grads.append(src)
            continue
        grads.append(torch.empty(param.shape, dtype=param.dtype, device=device))
        copy_to.append(grads[-1])
        copy_from.append(src)
    torch._foreach_copy_(copy_to, copy_from)
    return loss, (grad_y, *grads)
