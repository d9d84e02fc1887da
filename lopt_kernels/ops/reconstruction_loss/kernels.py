"""Triton kernels of the fused reconstruction loss (the row-wise work around the matmuls).

Every kernel is persistent over row tiles: program ``pid`` handles tiles pid, pid + G, pid + 2G, ...
of ``BLOCK_M`` rows each (G = number of programs), so per-column gradient sums stay in registers and
are added once per launch into the program's own row of an fp32 partial buffer (no atomics; the
partial rows are summed once after the last chunk).

Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors): numpy has no bfloat16, and the interpreter's
fp32 -> bf16 conversion truncates instead of rounding to nearest-even. The kernels therefore round
explicitly (bit arithmetic, ``ROUND_BF16``) before every bf16 store when they run interpreted, so the
interpreter reproduces the GPU's numerics; compiled kernels skip that step. All loads are converted
to fp32 before any arithmetic.
"""

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

@triton.jit
def round_bf16(v, ROUND_BF16: tl.constexpr):
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
def ln_forward_kernel(
    Y, stride_ym, stride_yh,  # chunk of y (strided)
    W, B,  # LayerNorm weight / bias (contiguous)
    NORMED,  # out: (m, h) in the matmul dtype
    MEAN, RSTD,  # out: (m,) fp32 row statistics, only if STORE_BWD
    ROW_MASK,  # (m,) uint8: 1 where the row counts (read only if HAS_ROW_MASK)
    n_rows, n_cols, eps, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, STORE_BWD: tl.constexpr, HAS_ROW_MASK: tl.constexpr,
    ROUND_BF16: tl.constexpr, ADD_BIAS: tl.constexpr = True,  # False: w * xhat (the GEMM path folds b downstream)
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
        # second pass: sum / h is off by up to an ulp of the row's values, which a (near-)constant row far from 0
        # would see as spread (fp32 rows at 1e4: var ~ 1e-6 against eps 1e-5); the mean of the residuals removes it
        mean += tl.sum(tl.where(mask, yv - mean[:, None], 0.0), axis=1) / n_cols
        centered = tl.where(mask, yv - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = centered * rstd[:, None]
        normed = xhat * w[None, :]
        if ADD_BIAS:
            normed = normed + b[None, :]
        offs = rows64[:, None] * n_cols + cols64[None, :]
        tl.store(NORMED + offs, round_bf16(normed, ROUND_BF16), mask=mask)
        if STORE_BWD:  # 8 bytes a row: the backward recomputes xhat from y (no m x h fp32 buffer)
            tl.store(MEAN + rows64, mean, mask=rmask)
            tl.store(RSTD + rows64, rstd, mask=rmask)


@triton.jit
def bias_gelu_forward_kernel(
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
        tl.store(ACT + offs, round_bf16(act, ROUND_BF16), mask=mask)


@triton.jit
def squared_error_kernel(
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
            tl.store(RECON + offs, round_bf16(d_recon, ROUND_BF16), mask=mask)
            dbias += tl.sum(d_recon, axis=0)
    loss_part = LOSS_PART + pid.to(tl.int64) * stride_part
    tl.store(loss_part, tl.load(loss_part) + tl.sum(loss_rows, axis=0))
    if COMPUTE_GRADS:
        part = DBU_PART + pid.to(tl.int64) * stride_part + cols64
        tl.store(part, tl.load(part, mask=cmask, other=0.0) + dbias, mask=cmask)


@triton.jit
def gelu_backward_kernel(
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
        # the forward's fp32 pre-activation, recomputed exactly as ``bias_gelu_forward_kernel`` formed it
        z = tl.load(PROJ + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d_z = tl.where(mask, d_act * (cdf + z * pdf), 0.0)
        tl.store(GRAD + offs, round_bf16(d_z, ROUND_BF16), mask=mask)
        dbias += tl.sum(d_z, axis=0)
    part = DBD_PART + pid.to(tl.int64) * stride_part + cols64
    tl.store(part, tl.load(part, mask=cmask, other=0.0) + dbias, mask=cmask)


@triton.jit
def ln_backward_kernel(
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
        tl.store(dy_ptrs, round_bf16(dy, ROUND_BF16), mask=mask)
    part = pid.to(tl.int64) * stride_part + cols64
    tl.store(DW_PART + part, tl.load(DW_PART + part, mask=cmask, other=0.0) + dw, mask=cmask)
    tl.store(DB_PART + part, tl.load(DB_PART + part, mask=cmask, other=0.0) + db, mask=cmask)


# Under TRITON_INTERPRET=1 (read when ``triton.jit`` decorates) the kernels are InterpretedFunctions.
INTERPRETED = not isinstance(ln_forward_kernel, JITFunction)
