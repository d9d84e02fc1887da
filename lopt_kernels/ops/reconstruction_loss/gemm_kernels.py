"""Triton GEMMs of the fused reconstruction loss with the row-wise work in their epilogues.

The ``"triton"`` GEMM path (``triton_driver``, ``LOPT_RECON_GEMMS=triton``) runs four of the six matmuls here, so
the reconstruction, ``d_act`` and ``d_normed`` never reach memory and the separate row kernels disappear:

- ``down_gelu_kernel``:  ``proj = normed @ W_down^T``; epilogue ``act = gelu(z)``, ``z = proj + b_down + W_down b``;
- ``up_error_kernel``:   ``recon = act @ W_up^T``; epilogue ``+ b_up - x``, the loss partials,
  ``d_recon = coef * (recon - x)`` and the up-bias partials (the reconstruction is never stored);
- ``act_grad_kernel``:   ``d_act = d_recon @ W_up``; epilogue ``d_z = d_act * gelu'(z)``, the down-bias partials
  and the LayerNorm backward's two row terms (below);
- ``ln_grad_kernel``:    ``d_normed = d_z @ W_down``; epilogue the LayerNorm backward: the rows of ``grad_y`` and the
  LayerNorm weight/bias partials (``d_normed`` is never stored).

The weight gradients (``d_recon^T @ act``, ``d_z^T @ normed``) stay on cuBLAS, accumulating in fp32.

The LayerNorm bias is folded into the down projection's: the LayerNorm forward stores ``normed = w * xhat`` (no
bias), ``proj = normed @ W_down^T``, and ``z = proj + (b_down + W_down @ b)`` in fp32 (the same expression, so the same
bits, in the forward and the GELU backward). The down weight's gradient ``d_z^T @ (w * xhat + b)`` then lacks
``outer(sum_rows d_z, b)``: the host adds it once per call (``sum_rows d_z`` is the down bias's gradient).

LayerNorm backward from r-wide data: ``grad_y = rstd * (dxhat - xhat * c1 - c2)`` with ``dxhat = d_normed * w``,
``c1 = mean_j(dxhat_j xhat_j)`` and ``c2 = mean_j(dxhat_j)``: row reductions over all h columns, which one output
tile of the ``d_normed`` GEMM does not see. Since ``d_normed = d_z @ W_down`` and ``w * xhat = normed``,

    h * c1 = sum_k d_z[k] * proj[k]      h * c2 = sum_k d_z[k] * (W_down @ w)[k]

(exact in real arithmetic, ``proj`` as stored; with the bias left in ``normed``, c1 would be a difference of two large
stored values when |b| >> |w|, and lose its precision): sums over r that ``act_grad_kernel``'s tiles form from the
``d_z`` and ``proj`` they already hold, one fp32 pair per row and column tile, summed in ``ln_grad_kernel``.

Column sums (bias and LayerNorm gradients) and the loss go to per-row-tile fp32 partial rows (each row tile and
column owned by one program: no atomics, deterministic), summed once per call. Under the interpreter the operands are
converted to fp32 before ``tl.dot`` (numpy has no bfloat16) and bf16 stores are rounded explicitly, as in
``kernels``.
"""

import triton
import triton.language as tl

from .kernels import round_bf16


@triton.jit
def _tile_position(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, in groups of ``GROUP_M`` row tiles (operand reuse in L2)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _output_tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows and columns of this program's output tile, and which of them exist."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < M, cols < N


@triton.jit
def _tile_masks(ROW_MASK, rows64, rmask, cmask, HAS_ROW_MASK: tl.constexpr):
    """The output tile's bounds mask, and the same with the rows ``ROW_MASK`` leaves out switched off."""
    inside = rmask[:, None] & cmask[None, :]
    counted = inside
    if HAS_ROW_MASK:
        counted = inside & (tl.load(ROW_MASK + rows64, mask=rmask, other=0) != 0)[:, None]
    return inside, counted


@triton.jit
def _matmul_tile(
    A, stride_am, stride_ak,  # (M, K) operand, any strides
    B, stride_bk, stride_bn,  # (K, N) operand, any strides (a weight or its transpose, as a view)
    M, N, K, pid_m, pid_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 ``A[rows] @ B[:, cols]`` for one output tile. Rows and columns past the edge wrap (``% M``, ``% N``) so the
    main loop's loads need only the K mask; the epilogues mask their stores."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if DOT_FP32:  # interpreter: numpy has no bf16 matmul (the products of bf16 values are exact in fp32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _as_stored(v, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` and back: the value a store of ``v`` keeps."""
    if ROUND_BF16:
        return round_bf16(v, ROUND_BF16)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _down_bias(BD, DOWN_W_LN, cols, cmask):
    """fp32 ``b_down + W_down @ b`` at ``cols``: the down projection's bias with the LayerNorm bias folded in."""
    return (tl.load(BD + cols, mask=cmask, other=0.0).to(tl.float32)
            + tl.load(DOWN_W_LN + 2 * cols + 1, mask=cmask, other=0.0))


@triton.jit
def down_gelu_kernel(
    NORMED,  # (M, K=h) LayerNorm output, contiguous, matmul dtype
    WD, stride_wd_r, stride_wd_h,  # (r, h) down weight
    BD,  # (r,) down bias
    DOWN_W_LN,  # (r, 2) fp32 contiguous: W_down @ [LayerNorm weight, LayerNorm bias]
    PROJ, ACT,  # out: (M, N=r) contiguous, matmul dtype; PROJ only if STORE_PROJ (the GELU backward's input)
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_PROJ: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid_m, pid_n = _tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(NORMED, K, 1, WD, stride_wd_h, stride_wd_r, M, N, K, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION)
    rows, cols, rmask, cmask = _output_tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    # z from the stored proj (ACT's dtype: PROJ is a placeholder without STORE_PROJ), so that the GELU backward's z
    # (proj re-read + the same bias) is bitwise this one
    proj = _as_stored(acc, ACT.dtype.element_ty, ROUND_BF16)
    z = proj + _down_bias(BD, DOWN_W_LN, cols, cmask)[None, :]
    act = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    if STORE_PROJ:
        tl.store(PROJ + offs, proj, mask=mask)
    tl.store(ACT + offs, round_bf16(act, ROUND_BF16), mask=mask)


@triton.jit
def up_error_kernel(
    ACT,  # (M, K=r) gelu output, contiguous, matmul dtype
    WU, stride_wu_h, stride_wu_r,  # (h, r) up weight
    BU,  # (h,) up bias
    X, stride_xm, stride_xh,  # (M, N=h) target rows, any strides
    COEF,  # (1,) fp32: 2 * grad_scale / (counted rows * h) (read only if COMPUTE_GRADS)
    ROW_MASK,  # (M,) uint8, 1 where the row counts (read only if HAS_ROW_MASK)
    D_RECON,  # out: (M, N) contiguous, matmul dtype (only if COMPUTE_GRADS)
    PART, stride_part, loss_col, bu_col,  # per-row-tile fp32 partial rows: the loss per column tile, the up bias
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COMPUTE_GRADS: tl.constexpr, HAS_ROW_MASK: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_m, pid_n = _tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(ACT, K, 1, WU, stride_wu_r, stride_wu_h, M, N, K, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION)
    rows, cols, rmask, cmask = _output_tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)
    store_mask, counted = _tile_masks(ROW_MASK, rows64, rmask, cmask, HAS_ROW_MASK)
    target = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xh, mask=counted, other=0.0)
    recon = acc + tl.load(BU + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # an excluded row's d_recon is exactly 0, so is every gradient downstream of it
    diff = tl.where(counted, recon - target.to(tl.float32), 0.0)
    part_row = PART + pid_m.to(tl.int64) * stride_part
    loss_ptr = part_row + loss_col + pid_n
    tl.store(loss_ptr, tl.load(loss_ptr) + tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if COMPUTE_GRADS:
        d_recon = diff * tl.load(COEF)
        tl.store(D_RECON + rows64[:, None] * N + cols[None, :], round_bf16(d_recon, ROUND_BF16), mask=store_mask)
        bu_ptrs = part_row + bu_col + cols
        tl.store(bu_ptrs, tl.load(bu_ptrs, mask=cmask, other=0.0) + tl.sum(d_recon, axis=0), mask=cmask)


@triton.jit
def act_grad_kernel(
    D_RECON,  # (M, K=h) contiguous, matmul dtype
    WU, stride_wu_h, stride_wu_r,  # (h, r) up weight
    PROJ,  # (M, N=r) the forward's proj (contiguous, matmul dtype)
    BD,  # (r,) down bias
    DOWN_W_LN,  # (r, 2) fp32 contiguous: W_down @ [LayerNorm weight, LayerNorm bias]
    D_Z,  # out: (M, N) contiguous, matmul dtype
    PART, stride_part, bd_col,  # per-row-tile fp32 partial rows: the down bias
    ROW_TERMS,  # out: (column tiles, 2, M) fp32, this tile's share of h * c1 and h * c2 per row
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid_m, pid_n = _tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(D_RECON, K, 1, WU, stride_wu_h, stride_wu_r, M, N, K, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION)
    rows, cols, rmask, cmask = _output_tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    proj = tl.load(PROJ + offs, mask=mask, other=0.0).to(tl.float32)
    z = proj + _down_bias(BD, DOWN_W_LN, cols, cmask)[None, :]
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    d_z = tl.where(mask, acc * (cdf + z * pdf), 0.0)
    tl.store(D_Z + offs, round_bf16(d_z, ROUND_BF16), mask=mask)
    bd_ptrs = PART + pid_m.to(tl.int64) * stride_part + bd_col + cols
    tl.store(bd_ptrs, tl.load(bd_ptrs, mask=cmask, other=0.0) + tl.sum(d_z, axis=0), mask=cmask)
    # the row terms from the d_z that the d_normed GEMM will read (as stored)
    d_z_stored = _as_stored(d_z, D_Z.dtype.element_ty, ROUND_BF16)
    wd_w = tl.load(DOWN_W_LN + 2 * cols, mask=cmask, other=0.0)
    terms = ROW_TERMS + pid_n.to(tl.int64) * 2 * M + rows
    tl.store(terms, tl.sum(d_z_stored * proj, axis=1), mask=rmask)
    tl.store(terms + M, tl.sum(d_z_stored * wd_w[None, :], axis=1), mask=rmask)


@triton.jit
def ln_grad_kernel(
    D_Z,  # (M, K=r) contiguous, matmul dtype
    WD, stride_wd_r, stride_wd_h,  # (r, h) down weight
    Y, stride_ym, stride_yh,  # (M, N=h) the block output rows, any strides, re-read to recompute xhat
    MEAN, RSTD,  # (M,) fp32 row statistics of the LayerNorm forward
    W,  # (h,) LayerNorm weight
    ROW_TERMS, term_tiles,  # (term_tiles, 2, M) fp32 from act_grad_kernel
    ROW_MASK,  # (M,) uint8, 1 where the row counts (read only if HAS_ROW_MASK)
    DY_SCALE,  # (1,) fp32 factor for grad_y (read only if HAS_DY_SCALE): undoes d_recon's storage scale
    DY, stride_dym, stride_dyh,  # out: (M, N) rows of grad_y
    PART, stride_part, w_col, b_col,  # per-row-tile fp32 partial rows: LayerNorm weight and bias
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr, HAS_DY_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_m, pid_n = _tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    d_normed = _matmul_tile(D_Z, K, 1, WD, stride_wd_r, stride_wd_h, M, N, K, pid_m, pid_n,
                            BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION)
    rows, cols, rmask, cmask = _output_tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)
    # as in the forward: an excluded row is zeros (finite whatever it holds), its d_z is 0
    mask, y_mask = _tile_masks(ROW_MASK, rows64, rmask, cmask, HAS_ROW_MASK)
    yv = tl.load(Y + rows64[:, None] * stride_ym + cols[None, :] * stride_yh, mask=y_mask, other=0.0)
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    xhat = tl.where(mask, yv.to(tl.float32) - mean[:, None], 0.0) * rstd[:, None]
    c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(0, term_tiles):
        c1 += tl.load(ROW_TERMS + t * 2 * M + rows, mask=rmask, other=0.0)
        c2 += tl.load(ROW_TERMS + (t * 2 + 1) * M + rows, mask=rmask, other=0.0)
    d_normed = tl.where(mask, d_normed, 0.0)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dy = (d_normed * w[None, :] - (xhat * (c1 / N)[:, None] + (c2 / N)[:, None])) * rstd[:, None]
    if HAS_DY_SCALE:
        dy = dy * tl.load(DY_SCALE)
    tl.store(DY + rows64[:, None] * stride_dym + cols[None, :] * stride_dyh, round_bf16(dy, ROUND_BF16), mask=mask)
    part_row = PART + pid_m.to(tl.int64) * stride_part + cols
    tl.store(part_row + w_col, tl.load(part_row + w_col, mask=cmask, other=0.0) + tl.sum(d_normed * xhat, axis=0),
             mask=cmask)
    tl.store(part_row + b_col, tl.load(part_row + b_col, mask=cmask, other=0.0) + tl.sum(d_normed, axis=0),
             mask=cmask)
