"""Fused reconstruction loss vs a plain, unfused fp32 PyTorch reference (torch and Triton backends).

The Triton backend runs on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so shapes stay small. With ``TRITON_INTERPRET=0`` on a
CUDA machine (``bench/gpu_check.py``) the same tests run on CUDA tensors with the compiled kernels; the
few that check the interpreter or CPU-only paths skip there.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lopt_kernels.ops.reconstruction_loss import (
    check_reconstruction_inputs,
    default_chunk_rows,
    reconstruction_loss,
    reconstruction_loss_and_grads,
    resolve_backend,
)

# the package's parts, where tests read or replace internals: the Triton path's host code (which launches the kernels
# it imports), the kernels, and the custom op (which calls either implementation)
rl_driver = importlib.import_module("lopt_kernels.ops.reconstruction_loss.triton_driver")
rl_kernels = importlib.import_module("lopt_kernels.ops.reconstruction_loss.kernels")
rl_op = importlib.import_module("lopt_kernels.ops.reconstruction_loss.custom_op")

NATIVE = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if NATIVE else "cpu")
interpreter_only = pytest.mark.skipif(NATIVE, reason="checks the Triton interpreter / CPU tensors")

H, R = 72, 18  # odd sizes: neither is a power of two, so every kernel masks its columns
EPS = 1e-5
SCALE = 0.37  # incoming gradient != 1
GRAD_NAMES = ("y", "norm_weight", "norm_bias", "down_weight", "down_bias", "up_weight", "up_bias")

# Tolerances.
# fp32: both backends do all arithmetic in fp32; only summation order differs from the reference.
# bf16: inputs and parameters are bf16 and the reference runs in fp32 on those same (already rounded)
# values, so the difference is the op's own rounding. The torch backend computes in fp32 and rounds
# only the returned gradients (relative error <= 2^-9). The Triton backend feeds the matmuls in bf16,
# as on the GPU: normed, act, recon, d_recon, d_act, d_z and d_normed are each rounded to bf16 (unit
# roundoff 2^-9 ~ 2e-3), a chain of up to ~7 roundings before grad_y (each error propagates through
# sums over h=72 or r=18 terms), which measures up to ~1e-2 of the largest gradient entry here (about
# 4-5 bf16 ulps at that magnitude); we allow 2e-2 of each tensor's max magnitude (atol) plus 2e-2
# relative (measured worst case: 0.2 of that bound over 3 seeds). The loss is a mean of squares whose
# inputs carry one bf16 rounding each (recon), so the errors mostly average out: measured <= 1.1e-3
# relative (rows=1, only 72 terms), rtol 5e-3.
# Under the interpreter the kernels round bf16 to nearest-even explicitly (the interpreter's own cast
# truncates), so these bounds are also what the compiled kernels see on a GPU.
TOL = {
    torch.float32: dict(loss_rtol=1e-4, loss_atol=1e-5, rtol=1e-4, atol=1e-5, scaled_atol=0.0),
    torch.bfloat16: dict(loss_rtol=5e-3, loss_atol=0.0, rtol=2e-2, atol=0.0, scaled_atol=2e-2),
}


def make_inputs(rows, dtype, layout="contiguous", seed=0, h=H, r=R, device=None):
    """(y, x, params) with y/x of ``rows`` rows on ``device`` (default: DEVICE); ``layout`` picks
    contiguous, strided or 3-D views."""
    g = torch.Generator().manual_seed(seed)
    device = DEVICE if device is None else device

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    if layout == "strided":
        # y: a transposed view with a row step (strides (2, 2*rows)); x: a column slice (row stride 2h)
        y = rand(h, 2 * rows).t()[::2]
        x = rand(rows, 2 * h)[:, :h]
        assert not y.is_contiguous() and not x.is_contiguous()
    elif layout == "3d":
        y = rand(rows, 2, h).transpose(0, 1)  # (2, rows, h), non-contiguous
        x = rand(2, rows, h)
    else:
        y, x = rand(rows, h), rand(rows, h)
    params = [
        rand(h, scale=0.1, shift=1.0),  # norm weight
        rand(h, scale=0.1),  # norm bias
        rand(r, h, scale=h**-0.5),  # down weight
        rand(r, scale=0.1),  # down bias
        rand(h, r, scale=r**-0.5),  # up weight
        rand(h, scale=0.1),  # up bias
    ]
    return y, x, params


def reference(y, x, params, scale=1.0):
    """Plain unfused fp32 autograd: loss and the gradients of ``scale * loss`` (y + six params)."""
    yf = y.detach().float().requires_grad_()
    pf = [p.detach().float().requires_grad_() for p in params]
    w, b, wd, bd, wu, bu = pf
    normed = F.layer_norm(yf, (yf.shape[-1],), w, b, EPS)
    recon = F.linear(F.gelu(F.linear(normed, wd, bd)), wu, bu)
    loss = ((recon - x.float()) ** 2).mean()
    (loss * scale).backward()
    return loss.detach(), [yf.grad, *(p.grad for p in pf)]


def assert_matches(loss, grads, ref_loss, ref_grads, dtype, params, y):
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=tol["loss_rtol"], atol=tol["loss_atol"])
    assert len(grads) == 7
    for name, got, want, like in zip(GRAD_NAMES, grads, ref_grads, (y, *params)):
        assert got.shape == like.shape, name
        assert got.dtype == like.dtype, name
        atol = max(tol["atol"], tol["scaled_atol"] * float(want.abs().max()))
        torch.testing.assert_close(got.float(), want, rtol=tol["rtol"], atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# The Triton backend twice: its default path (torch matmuls between row kernels) and its epilogue-GEMM path
BACKENDS = ["torch", "triton", pytest.param("triton", marks=pytest.mark.triton_gemms, id="triton-gemms")]


@pytest.fixture(autouse=True)
def gemm_path(request, monkeypatch):
    """``LOPT_RECON_GEMMS=triton`` for the cases marked ``triton_gemms``, the default path for the others."""
    if request.node.get_closest_marker("triton_gemms"):
        monkeypatch.setenv("LOPT_RECON_GEMMS", "triton")
    else:
        monkeypatch.delenv("LOPT_RECON_GEMMS", raising=False)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
CASES = [
    pytest.param(37, 16, "contiguous", id="rows37-chunk16-partial"),
    pytest.param(37, None, "contiguous", id="rows37-default-chunk"),
    pytest.param(1, None, "contiguous", id="rows1"),
    pytest.param(37, 16, "strided", id="rows37-strided-views"),
    pytest.param(5, 4, "3d", id="batch2x5-3d-chunk4"),
]


@pytest.mark.parametrize("rows,chunk_rows,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grads_match_reference(backend, dtype, rows, chunk_rows, layout):
    y, x, params = make_inputs(rows, dtype, layout)
    ref_loss, ref_grads = reference(y, x, params, scale=SCALE)
    loss, grads = reconstruction_loss_and_grads(
        y, x, *params, eps=EPS, grad_scale=SCALE, backend=backend, chunk_rows=chunk_rows
    )
    assert_matches(loss, grads, ref_loss, ref_grads, dtype, params, y)


@pytest.mark.parametrize("rows,chunk_rows,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_matches_reference(backend, dtype, rows, chunk_rows, layout):
    y, x, params = make_inputs(rows, dtype, layout)
    ref_loss, ref_grads = reference(y, x, params, scale=SCALE)
    yl = y.detach().requires_grad_()
    pl = [p.detach().requires_grad_() for p in params]
    loss = reconstruction_loss(yl, x, *pl, eps=EPS, backend=backend, chunk_rows=chunk_rows)
    (loss * SCALE).backward()
    assert_matches(loss.detach(), [yl.grad, *(p.grad for p in pl)], ref_loss, ref_grads, dtype, params, y)


def test_wide_strided_chunks_are_copied_contiguous(monkeypatch):
    """Above _STRIDED_MAX_BLOCK the kernels only ever see column stride 1 (a copy of the chunk), same results."""
    launches = []
    real = rl_driver.ln_forward_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(y, stride_ym, stride_yh, *args, **kwargs):
                launches.append(stride_yh)
                return real[grid](y, stride_ym, stride_yh, *args, **kwargs)
            return run

    monkeypatch.setattr(rl_driver, "_STRIDED_MAX_BLOCK", 64)  # H = 72: BLOCK_H 128 counts as wide
    monkeypatch.setattr(rl_driver, "ln_forward_kernel", Spy())
    y, x, params = make_inputs(37, torch.float32, "strided")
    ref_loss, ref_grads = reference(y, x, params, scale=SCALE)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, grad_scale=SCALE, backend="triton", chunk_rows=16)
    assert launches == [1, 1, 1]
    assert_matches(loss, grads, ref_loss, ref_grads, torch.float32, params, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_tensor(backend):
    y, x, params = make_inputs(37, torch.float32)
    ref_loss, ref_grads = reference(y, x, params, scale=SCALE)
    loss, grads = reconstruction_loss_and_grads(
        y, x, *params, grad_scale=torch.tensor(SCALE), backend=backend, chunk_rows=16
    )
    assert_matches(loss, grads, ref_loss, ref_grads, torch.float32, params, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_partial_requires_grad(backend):
    """Only some inputs require grad: the others get None, the rest still match."""
    y, x, params = make_inputs(37, torch.float32)
    ref_loss, ref_grads = reference(y, x, params)
    pl = [p.clone() for p in params]
    pl[4].requires_grad_()
    loss = reconstruction_loss(y, x, *pl, backend=backend, chunk_rows=16)
    loss.backward()
    assert y.grad is None and all(p.grad is None for i, p in enumerate(pl) if i != 4)
    torch.testing.assert_close(pl[4].grad, ref_grads[5], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_grads_false_returns_loss_only(backend, monkeypatch):
    y, x, params = make_inputs(37, torch.float32)
    ref_loss, _ = reference(y, x, params)
    impl_name = "triton_loss_and_grads" if backend == "triton" else "torch_loss_and_grads"
    calls = []
    real = getattr(rl_op, impl_name)

    def spy(*args):
        calls.append(args[0].compute_grads)
        return real(*args)

    monkeypatch.setattr(rl_op, impl_name, spy)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, compute_grads=False, backend=backend, chunk_rows=16)
    assert grads is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    # the differentiable entry point computes no gradients when nothing needs them
    with torch.no_grad():
        loss2 = reconstruction_loss(y, x, *(p.detach().requires_grad_() for p in params), backend=backend)
    loss3 = reconstruction_loss(y, x, *params, backend=backend)
    assert not loss3.requires_grad
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-4, atol=1e-5)
    assert calls == [False, False, False]


@pytest.mark.parametrize(
    "y_dtype,param_dtype",
    [
        pytest.param(torch.bfloat16, torch.float32, id="bf16-rows-fp32-params"),
        pytest.param(torch.float32, torch.bfloat16, id="fp32-rows-bf16-params"),
        pytest.param(torch.float16, torch.float16, id="fp16"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_and_half_dtypes(backend, y_dtype, param_dtype):
    """grad_y comes back in y's dtype, parameter grads in the parameters' dtype (bf16 bounds apply)."""
    y, x, _ = make_inputs(37, y_dtype)
    _, _, params = make_inputs(37, param_dtype)
    ref_loss, ref_grads = reference(y, x, params, scale=SCALE)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, grad_scale=SCALE, backend=backend, chunk_rows=16)
    assert_matches(loss, grads, ref_loss, ref_grads, torch.bfloat16, params, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_raises(backend):
    """The backward scales the saved gradients in place: retain_graph reuse fails loudly, not silently."""
    y, x, params = make_inputs(5, torch.float32)
    yl = y.detach().requires_grad_()
    loss = reconstruction_loss(yl, x, *params, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


# ------------------------------------------------------------------------ row mask (aux_mask="tokens")


def _row_mask_for(y):
    """Every third row excluded, and the first two (a left-padded sequence), in y's row shape."""
    rows = torch.arange(y.numel() // y.shape[-1], device=y.device)
    return ((rows % 3 != 1) & (rows >= 2)).reshape(y.shape[:-1])


def _poison_excluded(t, mask):
    """A copy of ``t`` with inf / nan in the excluded rows (whatever padding holds must not leak)."""
    t = t.clone()
    bad = torch.full_like(t[~mask], float("inf"))
    bad[..., ::2] = float("nan")
    t[~mask] = bad
    return t


@pytest.mark.parametrize("rows,chunk_rows,layout", CASES[:1] + CASES[3:])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_mask_matches_the_reference_over_the_counted_rows(backend, dtype, rows, chunk_rows, layout):
    """The masked op equals the reference on the counted rows alone (gathered), grad_y is zero on the
    excluded rows, and inf / nan there change nothing."""
    y, x, params = make_inputs(rows, dtype, layout)
    mask = _row_mask_for(y)
    ref_loss, ref_grads = reference(y[mask], x[mask], params, scale=SCALE)
    y_bad, x_bad = _poison_excluded(y, mask), _poison_excluded(x, mask)
    loss, grads = reconstruction_loss_and_grads(
        y_bad, x_bad, *params, eps=EPS, grad_scale=SCALE, backend=backend, chunk_rows=chunk_rows, row_mask=mask
    )
    assert torch.all(grads[0][~mask] == 0)
    assert_matches(loss, (grads[0][mask], *grads[1:]), ref_loss, ref_grads, dtype, params, y[mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_mask_autograd_and_loss_only(backend):
    y, x, params = make_inputs(37, torch.float32)
    mask = _row_mask_for(y)
    ref_loss, ref_grads = reference(y[mask], x[mask], params)
    yl = y.detach().requires_grad_()
    pl = [p.detach().requires_grad_() for p in params]
    loss = reconstruction_loss(yl, x, *pl, eps=EPS, backend=backend, chunk_rows=16, row_mask=mask)
    loss.backward()
    assert torch.all(yl.grad[~mask] == 0)
    assert_matches(loss.detach(), [yl.grad[mask], *(p.grad for p in pl)], ref_loss, ref_grads, torch.float32,
                   params, y[mask])
    with torch.no_grad():
        only = reconstruction_loss(y, x, *params, eps=EPS, backend=backend, row_mask=mask)
    torch.testing.assert_close(only, ref_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_mask_without_counted_rows_gives_zero_loss_and_gradients(backend):
    y, x, params = make_inputs(9, torch.bfloat16)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, backend=backend, row_mask=torch.zeros(9, dtype=torch.bool,
                                                                                                     device=DEVICE))
    assert float(loss) == 0.0
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize(
    "mask,pattern",
    [
        pytest.param(torch.ones(4, dtype=torch.int64), "row_mask must be a bool tensor", id="int-mask"),
        pytest.param(torch.ones(5, dtype=torch.bool), r"row_mask \(5,\) must have one entry per row", id="rows"),
        pytest.param(torch.ones(4, dtype=torch.bool, device="meta"), "row_mask on meta but y on cpu", id="device"),
        # y (2, 2, 8): four rows, but a (4, 1) mask is not laid out as (batch, seq); before, any 4 entries passed
        pytest.param(torch.ones(4, 1, dtype=torch.bool), r"row_mask \(4, 1\) must have one entry per row", id="layout"),
    ],
)
def test_bad_row_mask_raises_value_error(mask, pattern):
    y, x, *params = _good()
    with pytest.raises(ValueError, match=pattern):
        reconstruction_loss_and_grads(y.view(2, 2, 8), x.view(2, 2, 8), *params, backend="torch", row_mask=mask)


# ----------------------------------------------------------------------------------- bad inputs


def _good():
    y, x, params = make_inputs(4, torch.float32, h=8, r=4, device="cpu")
    return [y, x, *params]


@pytest.mark.parametrize(
    "index,bad,pattern",
    [
        pytest.param(1, torch.zeros(4, 9), r"y \(4, 8\) and target x \(4, 9\)", id="y-x-shape-mismatch"),
        pytest.param(4, torch.zeros(4, 9), r"down_weight \(4, 8\)", id="decoder-hidden-mismatch"),
        pytest.param(7, torch.zeros(9), r"up_bias \(8,\)", id="up-bias-hidden-mismatch"),
        pytest.param(0, torch.zeros(4, 8, dtype=torch.int64), r"y must be a floating-point", id="int-y"),
        pytest.param(5, torch.zeros(4, dtype=torch.int32), r"down_bias must be a floating-point", id="int-param"),
        pytest.param(1, torch.zeros(4, 8, device="meta"), r"x on meta", id="x-other-device"),
        pytest.param(6, torch.zeros(8, 4, device="meta"), r"up_weight on meta", id="param-other-device"),
        pytest.param(1, torch.zeros(4, 8, dtype=torch.float64), r"y \(torch.float32\) and x \(torch.float64\)", id="y-x-dtype"),
    ],
)
@pytest.mark.parametrize("entry", ["check", "loss_and_grads", "loss"])
def test_bad_inputs_raise_value_error_naming_tensors(entry, index, bad, pattern):
    args = _good()
    args[index] = bad
    fn = {
        "check": check_reconstruction_inputs,
        "loss_and_grads": lambda *a: reconstruction_loss_and_grads(*a, backend="torch"),
        "loss": lambda *a: reconstruction_loss(*a, backend="torch"),
    }[entry]
    with pytest.raises(ValueError, match=pattern):
        fn(*args)


def test_bad_backend_and_chunk_rows():
    args = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        reconstruction_loss_and_grads(*args, backend="cuda")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        reconstruction_loss_and_grads(*args, chunk_rows=0)
    for bad in (2.7, True):  # before: accepted silently
        with pytest.raises(ValueError, match="chunk_rows must be an int"):
            reconstruction_loss_and_grads(*args, chunk_rows=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_grad_scale_and_sizes_raise_value_error(backend):
    """A grad_scale of several elements (before: broadcast over the columns by the torch backend, a reshape error
    from the Triton one), an empty bottleneck (before: ZeroDivisionError from the Triton tile settings) and a 1-D
    down weight (before: "expected (-1, h)") are refused, naming the problem."""
    y, x, (nw, nb, wd, bd, wu, bu) = make_inputs(4, torch.float32, h=8, r=4)
    with pytest.raises(ValueError, match="grad_scale must be a float or a one-element tensor"):
        reconstruction_loss_and_grads(y, x, nw, nb, wd, bd, wu, bu, grad_scale=torch.ones(2, device=y.device),
                                      backend=backend)
    with pytest.raises(ValueError, match="bottleneck is empty"):
        reconstruction_loss_and_grads(y, x, nw, nb, wd[:0], bd[:0], wu[:, :0], bu, backend=backend)
    with pytest.raises(ValueError, match="down_weight must be 2-D"):
        reconstruction_loss_and_grads(y, x, nw, nb, wd.reshape(-1), bd, wu, bu, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiating_the_loss_twice_raises(backend):
    """The op's gradients are computed in its forward, with no graph of their own: a gradient penalty through it
    (``create_graph=True``) must raise, not treat the loss's gradient as a constant (before: a second-order
    gradient of 0.00065 against the reference's 0.0609, with no error)."""
    y, x, params = make_inputs(5, torch.float32)
    y.requires_grad_(True)
    loss = reconstruction_loss(y, x, *params, backend=backend) + 1e-3 * y.pow(2).sum()
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, y, create_graph=True)


def test_torch_backend_gradients_are_contiguous_for_transposed_weights():
    """Weights stored transposed (views): the torch backend returns contiguous gradients, as the op's fake kernel
    says (before: the transposed strides, and ``torch.compile(fullgraph=True)`` failed on the stride mismatch)."""
    y, x, (nw, nb, wd, bd, wu, bu) = make_inputs(6, torch.float32, device="cpu")
    wd_t, wu_t = wd.t().contiguous().t(), wu.t().contiguous().t()
    assert not wd_t.is_contiguous() and not wu_t.is_contiguous()
    _, grads = reconstruction_loss_and_grads(y, x, nw, nb, wd_t, bd, wu_t, bu, backend="torch")
    assert all(g.is_contiguous() for g in grads)
    torch.library.opcheck(torch.ops.lopt_kernels.reconstruction_loss_and_grads.default,
                          (y, x, nw, nb, wd_t, bd, wu_t, bu, EPS, 1.0, None, "torch", 4, None))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        reconstruction_loss_and_grads(*_good(), backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"


# ---------------------------------------------------------------------- device guard (issue 9, case 16)
# Triton launches on the *current* CUDA device while cuBLAS and allocations follow the tensors: with a
# block on cuda:1 (device_map="auto") an unguarded launch reads cuda:1 memory from cuda:0 (illegal access)
# or runs on another device's stream. The launcher must run under ``torch.cuda.device(y.device)``.


class _RecordingDevice:
    """Stands in for ``torch.cuda.device``: records the device it is entered with and keeps a stack."""

    entered: list = []
    active: list = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        type(self).entered.append(self.device)
        type(self).active.append(self.device)
        return self

    def __exit__(self, *exc):
        type(self).active.pop()
        return False


@pytest.fixture
def recording_cuda_device(monkeypatch):
    monkeypatch.setattr(_RecordingDevice, "entered", [])
    monkeypatch.setattr(_RecordingDevice, "active", [])
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    return _RecordingDevice


@interpreter_only
def test_triton_launches_run_under_the_device_guard_of_y(recording_cuda_device, monkeypatch):
    # Pretend y is a CUDA tensor: the guard takes the branch it takes for CUDA tensors, entering
    # torch.cuda.device(y.device) (here the recorder), while the kernels run interpreted on CPU.
    monkeypatch.setattr(rl_driver, "_device_guard", lambda device: torch.cuda.device(device), raising=False)
    launches = []

    class LaunchRecorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches.append((self.name, list(recording_cuda_device.active)))
                return launch(*args, **kwargs)

            return run

    kernels = [n for n in vars(rl_driver) if n.endswith("_kernel")]
    assert len(kernels) == 9, kernels  # five row kernels, four epilogue GEMMs
    for name in kernels:
        monkeypatch.setattr(rl_driver, name, LaunchRecorder(name, getattr(rl_driver, name)))
    y, x, params = make_inputs(37, torch.float32)
    ref_loss, _ = reference(y, x, params)
    for gemms in rl_driver.GEMM_PATHS:
        monkeypatch.setenv("LOPT_RECON_GEMMS", gemms)
        loss, grads = reconstruction_loss_and_grads(y, x, *params, backend="triton", chunk_rows=16)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert {name for name, _ in launches} == set(kernels)
    unguarded = [(name, active) for name, active in launches if active[-1:] != [y.device]]
    assert not unguarded, f"Triton kernels launched outside torch.cuda.device({y.device}): {unguarded[:3]}"


def test_device_guard_is_the_tensor_device_for_cuda_and_a_no_op_otherwise(recording_cuda_device):
    with rl_driver._device_guard(torch.device("cuda", 1)):
        assert recording_cuda_device.active == [torch.device("cuda", 1)]
    assert recording_cuda_device.entered == [torch.device("cuda", 1)]
    with rl_driver._device_guard(torch.device("cpu")):
        assert recording_cuda_device.active == []
    assert recording_cuda_device.entered == [torch.device("cuda", 1)]  # CPU tensors: torch.cuda never touched


# ---------------------------------------------------------------------- torch.compile / FakeTensor


def test_torch_compile_matches_eager():
    y, x, params = make_inputs(37, torch.float32)

    def step(y, x, *params):
        return reconstruction_loss(y, x, *params, chunk_rows=16) * SCALE

    def run(fn):
        yl = y.detach().requires_grad_()
        pl = [p.detach().requires_grad_() for p in params]
        loss = fn(yl, x, *pl)
        loss.backward()
        return loss.detach(), [yl.grad, *(p.grad for p in pl)]

    torch._dynamo.reset()
    eager_loss, eager_grads = run(step)
    compiled_loss, compiled_grads = run(torch.compile(step, fullgraph=False))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(GRAD_NAMES, compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    ref_loss, _ = reference(y, x, params)
    torch.testing.assert_close(compiled_loss, ref_loss * SCALE, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensor_mode(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y, x, params = make_inputs(6, torch.bfloat16, layout="3d")
        loss = reconstruction_loss(y, x, *params, backend=backend)
        assert loss.shape == () and loss.dtype == torch.float32
        loss, grads = reconstruction_loss_and_grads(y, x, *params, backend=backend)
        assert loss.shape == () and loss.dtype == torch.float32
        assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (y, *params)]
        assert all(g.dtype == torch.bfloat16 for g in grads)
        yl = y.detach().requires_grad_()
        loss = reconstruction_loss(yl, x, *params, backend=backend)
        assert loss.shape == () and loss.dtype == torch.float32 and loss.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_meta_inputs_give_meta_results_and_a_meta_grad_scale_needs_meta_inputs(backend, monkeypatch):
    """Meta tensors (shape tracing, FSDP's deferred init): every input on meta, with a meta grad_scale too, gives meta
    results of the right shapes and dtypes, also for backend="triton" without the interpreter (before: a RuntimeError
    asking for TRITON_INTERPRET=1, though only the fake implementation runs on meta). A meta grad_scale with real
    inputs, which has no value to scale by, raises a ValueError naming it (before: a bare NotImplementedError,
    'Cannot copy out of meta tensor; no data!')."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read by resolve_backend per call; the kernels stay as imported
    y, x, params = make_inputs(5, torch.float16, layout="3d", h=6, r=2, device="cpu")
    meta = [t.to("meta") for t in (y, x, *params)]
    scale = torch.tensor(2.0, device="meta")
    loss, grads = reconstruction_loss_and_grads(*meta, grad_scale=scale, backend=backend)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    assert [(g.device.type, g.shape, g.dtype) for g in grads] == [("meta", t.shape, t.dtype) for t in meta[:1] + meta[2:]]
    y_meta = meta[0].requires_grad_()
    loss = reconstruction_loss(y_meta, *meta[1:], backend=backend)
    loss.backward()
    assert y_meta.grad.device.type == "meta" and y_meta.grad.shape == y.shape and y_meta.grad.dtype == torch.float16
    with pytest.raises(ValueError, match="grad_scale is a meta tensor .* but y is on cpu"):
        reconstruction_loss_and_grads(y, x, *params, grad_scale=scale, backend="torch")


def test_custom_ops_opcheck():
    """The registered custom ops' schemas and fake implementations agree with the real ones."""
    y, x, params = make_inputs(9, torch.float32)
    torch.library.opcheck(
        torch.ops.lopt_kernels.reconstruction_loss.default, (y, x, *params, EPS, "torch", 4, None),
        test_utils=("test_schema", "test_faketensor"),
    )
    mask = torch.arange(9, device=DEVICE) % 3 != 0
    for row_mask in (None, mask):
        torch.library.opcheck(
            torch.ops.lopt_kernels.reconstruction_loss_and_grads.default,
            (y, x, *params, EPS, 0.5, torch.tensor(2.0, device=DEVICE), "torch", 4, row_mask),
            test_utils=("test_schema", "test_faketensor"),
        )


# ----------------------------------------------------------------------- kernels beyond the interpreter


@triton.jit
def _round_probe_kernel(X, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    v = tl.load(X + offs).to(tl.float32)
    tl.store(OUT + offs, rl_kernels.round_bf16(v, True).to(tl.bfloat16))


@interpreter_only
def test_interpreter_bf16_stores_round_to_nearest_even():
    """The kernels' explicit rounding makes interpreted bf16 stores match torch's fp32 -> bf16 cast."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 0.0, -0.0, float("inf"), -float("inf")])
    scales = 10.0 ** torch.randint(-6, 6, (4096 - special.numel(),), generator=g)
    x = torch.cat([torch.randn(scales.numel(), generator=g) * scales, special])  # ties, signs, infinities
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    _round_probe_kernel[(1,)](x, out, x.numel())
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import contextlib, importlib, io, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rl = importlib.import_module("lopt_kernels.ops.reconstruction_loss.triton_driver")
    from lopt_kernels.ops.reconstruction_loss import default_chunk_rows
    assert not rl.INTERPRETED, "kernels must be JIT functions here"
    target = GPUTarget("cuda", 90, 32)
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spill bytes of each kernel
    seen, spills, checked, table = set(), [], 0, []

    def compile_kernel(fn, args, constexprs, num_warps, num_stages=None):
        # Specialised as the JIT specialises a real launch: pointers 16-byte aligned, integers equal to 1
        # become constexprs, integers divisible by 16 carry tt.divisibility; None: an unspecialised i32.
        global checked
        signature, attrs, consts = {}, {}, dict(constexprs)
        for i, name in enumerate(fn.arg_names):
            v = args.get(name)
            if name in consts:
                signature[name] = "constexpr"
            elif isinstance(v, str):
                signature[name] = v
                if v.startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif v == 1:
                signature[name], consts[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if v is not None and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        key = (src.hash(), num_warps, num_stages)
        if key in seen:  # e.g. h = 5120 and 8192 share BLOCK_H; the cache would hide ptxas' log
            return
        seen.add(key)
        log = io.StringIO()
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options)
        assert kernel.asm["cubin"], fn.__name__
        found = re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log.getvalue())
        assert len(found) == 1, (fn.__name__, log.getvalue()[-2000:])
        regs = re.findall(r"Used (\\d+) registers", log.getvalue())
        strided = args.get("stride_yh", args.get("stride_xh", 1)) is None
        table.append((fn.__name__, args.get("n_cols", args.get("N")), ("strided" if strided else "") +
                      (" masked" if constexprs.get("HAS_ROW_MASK") else ""), num_warps, regs[0] if regs else "?",
                      found[0][0]))
        checked += 1
        if found[0] != ("0", "0"):
            spills.append(f"{fn.__name__} {constexprs} num_warps={num_warps} args={args}: "
                          f"{found[0][0]} B spill stores, {found[0][1]} B spill loads")

    f32, progs, rows = "*fp32", 132, 16384
    shapes = [("*bf16", h, h // 4) for h in (2048, 4096, 5120, 8192)] + [("*fp32", 72, 18)]
    for mm, h, r in shapes:
        bh, br = triton.next_power_of_2(h), triton.next_power_of_2(r)
        m = default_chunk_rows(rows, h, r)
        bm_h, w_h = rl._tile_settings(bh, rows)
        bm_r, w_r = rl._tile_settings(br, rows)
        part_stride = 3 * rl._round_up(h, 32) + rl._round_up(r, 32) + 32
        sizes_h = dict(n_rows=m, n_cols=h, num_progs=progs)
        sizes_r = dict(n_rows=m, n_cols=r, num_progs=progs)
        # y and x contiguous (column stride 1, the usual launch) and as arbitrary strided views (below
        # BLOCK_H 8192 only: wider strided chunks are copied to contiguous ones by the host code)
        for col_stride in (1, None) if bh <= rl._STRIDED_MAX_BLOCK else (1,):
            ys = dict(stride_ym=h if col_stride else None, stride_yh=col_stride)
            xs = dict(stride_xm=ys["stride_ym"], stride_xh=col_stride)
            for masked in (False, True):  # aux_mask="tokens": the row mask read by three kernels
                for flag in (True, False):
                    for add_bias in (True, False):  # False: the epilogue-GEMM path's w * xhat
                        compile_kernel(rl.ln_forward_kernel,
                            dict(Y=mm, W=mm, B=mm, NORMED=mm, MEAN=f32, RSTD=f32, ROW_MASK="*u8", eps="fp32", **ys,
                                 **sizes_h),
                            dict(BLOCK_M=bm_h, BLOCK_H=bh, STORE_BWD=flag, HAS_ROW_MASK=masked, ROUND_BF16=False,
                                 ADD_BIAS=add_bias), w_h)
                    compile_kernel(rl.squared_error_kernel,
                        dict(RECON=mm, BU=mm, X=mm, COEF=f32, ROW_MASK="*u8", LOSS_PART=f32, DBU_PART=f32,
                             stride_part=part_stride if flag else 1, **xs, **sizes_h),
                        dict(BLOCK_M=bm_h, BLOCK_H=bh, COMPUTE_GRADS=flag, HAS_ROW_MASK=masked, ROUND_BF16=False),
                        w_h)
                for dy_scale in (False, True):  # True: fp16 matmuls (d_recon stored scaled)
                    compile_kernel(rl.ln_backward_kernel,
                        dict(DNORMED=mm, Y=mm, MEAN=f32, RSTD=f32, W=mm, DY=mm, DW_PART=f32, DB_PART=f32,
                             stride_part=part_stride, ROW_MASK="*u8", DY_SCALE=f32, **ys, stride_dym=h, stride_dyh=1,
                             **sizes_h),
                        dict(BLOCK_M=bm_h, BLOCK_H=bh, HAS_ROW_MASK=masked, HAS_DY_SCALE=dy_scale, ROUND_BF16=False),
                        w_h)
        compile_kernel(rl.bias_gelu_forward_kernel, dict(PROJ=mm, BD=mm, ACT=mm, **sizes_r),
            dict(BLOCK_M=bm_r, BLOCK_R=br, ROUND_BF16=False), w_r)
        compile_kernel(rl.gelu_backward_kernel,
            dict(GRAD=mm, PROJ=mm, BD=mm, DBD_PART=f32, stride_part=part_stride, **sizes_r),
            dict(BLOCK_M=bm_r, BLOCK_R=br, ROUND_BF16=False), w_r)
    # the epilogue GEMMs (LOPT_RECON_GEMMS=triton) with the host code's tile configs: bf16 at the benchmark sizes (the
    # sizes are runtime integers: the variants differ by their flags and y/x layouts), fp16 (d_recon stored scaled),
    # fp32 (its own tiles) with contiguous y/x
    import torch
    dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
    for mm, h, r in [("*bf16", 4096, 1024), ("*fp16", 4096, 1024), ("*fp32", 72, 18)]:
        m = default_chunk_rows(rows, h, r)
        precision = "ieee"
        def gemm(fn, name, n, k, args, **flags):
            bm, bn, bk, warps, stages = rl._gemm_config(name, dtypes[mm])
            compile_kernel(fn, dict(M=m, N=n, K=k, **args),
                           dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=rl._GROUP_M, DOT_FP32=False,
                                INPUT_PRECISION=precision, **flags), warps, stages)
        weights_d = dict(WD=mm, stride_wd_r=h, stride_wd_h=1)
        weights_u = dict(WU=mm, stride_wu_h=r, stride_wu_r=1)
        part = dict(PART=f32, stride_part=3 * rl._round_up(h, 32) + rl._round_up(r, 32) + 32)
        for store in (True, False):
            gemm(rl.down_gelu_kernel, "down_gelu", r, h,
                 dict(NORMED=mm, BD=mm, DOWN_W_LN=f32, PROJ=mm, ACT=mm, **weights_d),
                 STORE_PROJ=store, ROUND_BF16=False)
        for col_stride in (1, None) if mm == "*bf16" else (1,):
            for masked in (False, True):
                for grads in (True, False):
                    gemm(rl.up_error_kernel, "up_error", h, r,
                         dict(ACT=mm, BU=mm, X=mm, stride_xm=h if col_stride else None, stride_xh=col_stride,
                              COEF=f32, ROW_MASK="*u8", D_RECON=mm, loss_col=None, bu_col=None, **weights_u, **part),
                         COMPUTE_GRADS=grads, HAS_ROW_MASK=masked, ROUND_BF16=False)
                for dy_scale in (False, True):
                    gemm(rl.ln_grad_kernel, "ln_grad", h, r,
                         dict(D_Z=mm, Y=mm, stride_ym=h if col_stride else None, stride_yh=col_stride, MEAN=f32,
                              RSTD=f32, W=mm, ROW_TERMS=f32, term_tiles=None, ROW_MASK="*u8", DY_SCALE=f32, DY=mm,
                              stride_dym=h, stride_dyh=1, w_col=None, b_col=None, **weights_d, **part),
                         HAS_ROW_MASK=masked, HAS_DY_SCALE=dy_scale, ROUND_BF16=False)
        gemm(rl.act_grad_kernel, "act_grad", r, h,
             dict(D_RECON=mm, PROJ=mm, BD=mm, DOWN_W_LN=f32, D_Z=mm, bd_col=None, ROW_TERMS=f32, **weights_u, **part),
             ROUND_BF16=False)
    for row in table:  # the register table (pytest -s shows it)
        print("%-26s cols=%-5s %-14s warps=%-2s registers=%-4s spill bytes=%s" % row)
    assert not spills, "register spills on sm_90:\\n" + "\\n".join(spills)
    print(f"triton {triton.__version__}")
    print(f"compiled {checked} kernel variants, no spills")
    """
)


@pytest.mark.parametrize("toolchain", ["installed", "compat"])
def test_kernels_compile_for_sm90(tmp_path, toolchain):
    """Compile every kernel variant to a cubin for an H100 (no GPU needed): catches code the
    interpreter accepts but the compiler rejects (types, constexpr branches, loop-carried values).

    Covers h in {2048, 4096, 5120, 8192} (bf16, r = h / 4, contiguous and strided y/x) and h = 72
    (fp32), with the tile settings and chunk rows the host code picks, and fails on any register
    spill that ptxas reports (``ptxas -v``: bytes spill stores / loads). ``compat``: the same with the Triton
    in the folder ``LOPT_COMPAT_TRITON`` names (``.ci/run`` installs 3.6.0 there, the H200 image's, whose
    ptxas spilled in variants that 3.9's did not)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    triton_dir = os.path.dirname(triton.__file__)
    if toolchain == "compat":
        compat = os.environ.get("LOPT_COMPAT_TRITON", "")
        if not os.path.isdir(os.path.join(compat, "triton")):
            pytest.skip("LOPT_COMPAT_TRITON names no folder with another Triton "
                        "(pip install --no-deps --target DIR triton==3.6.0)")
        triton_dir = os.path.join(compat, "triton")
        env["PYTHONPATH"] = os.pathsep.join([compat, root, env.get("PYTHONPATH", "")])
    nvidia = os.path.join(triton_dir, "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(nvidia):
        pytest.skip("triton's nvidia backend (ptxas) is not installed")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "no spills" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"triton {triton.__version__}" in proc.stdout or toolchain == "compat"
    print(proc.stdout)


# --------------------------------------------------------------------------------- workspace (issue 11)


def _workspace_of_one_call(rows, h, r):
    """Peak allocator bytes of one fp32 forward + backward on the Triton backend beyond its inputs and results
    (``lopt_kernels.measure``'s dispatcher-based tracker), with the results and inputs."""
    from lopt_kernels.measure import _StepAllocations

    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(rows, h, generator=g), torch.randn(rows, h, generator=g)
    params = [torch.randn(*s, generator=g) * 0.05 for s in ((h,), (h,), (r, h), (r,), (h, r), (h,))]
    params[0] += 1.0
    tracker = _StepAllocations()
    with tracker:
        loss, grads = reconstruction_loss_and_grads(y, x, *params, backend="triton")
    returned = loss.untyped_storage().nbytes() + sum(t.untyped_storage().nbytes() for t in grads)
    return tracker.peak - returned, loss, grads, y, x, params


@interpreter_only
def test_triton_workspace_has_no_fp32_xhat_or_z_buffers():
    """Peak extra allocator bytes of one forward + backward under the interpreter, rows 4096, h 1024,
    r 256, fp32, excluding the inputs and the returned loss and gradients.

    Counted with ``lopt_kernels.measure``'s dispatcher-based tracker (live bytes of every storage the
    op's body allocates). With one chunk of m rows (m = min(rows, default_chunk_rows(rows, h, r)), s the
    matmul dtype's size, G the programs of the persistent kernels) the op holds

        normed, recon (m x h) + proj, act (m x r) in the matmul dtype   m * (2h + 2r) * s
        row mean and rstd (fp32)                                          8 * m
        per-program partials: LN weight, LN bias, up bias, down bias,
        loss (fp32), each segment padded to 32 floats                     4 * G * (3h' + r' + 32)
        scalars (the gradient coefficient, the loss sum)                  <= 64 bytes

    (fp32 weight-gradient accumulators are returned as the gradients themselves). Before issue 11 it
    also held an fp32 ``xhat`` (4 * m * h) and an fp32 ``z`` (4 * m * r): 60.07 MiB here vs 40.08 MiB.
    """
    rows, h, r = 4096, 1024, 256
    workspace, *_ = _workspace_of_one_call(rows, h, r)

    m, s, progs = min(rows, default_chunk_rows(rows, h, r)), 4, rl_driver._num_programs("cpu", None) * rl_driver._PARTIAL_PROGRAMS_PER_SM
    bound = m * (2 * h + 2 * r) * s + 8 * m + 4 * progs * (3 * rl_driver._round_up(h, 32) + rl_driver._round_up(r, 32) + 32) + 64
    old_xhat_and_z = 4 * m * h + 4 * m * r
    print(f"workspace {workspace:,} B ({workspace / 2**20:.2f} MiB), bound {bound:,} B, "
          f"with the old xhat and z buffers {workspace + old_xhat_and_z:,} B")
    assert workspace <= bound, (workspace, bound)
    assert workspace + old_xhat_and_z > bound  # the bound is tight: the old buffers would not fit


@interpreter_only
def test_triton_gemms_workspace_holds_no_reconstruction_or_d_normed(monkeypatch):
    """The epilogue-GEMM path's peak extra bytes (rows 200, h 96, r 24, fp32, one chunk of m rows): the same four
    matmul-dtype chunk buffers as the default path (normed, d_recon: m x h; proj, act -> d_z: m x r), no buffer for the
    reconstruction or d_normed, plus the row terms (2 fp32 per row and column tile of r), the row statistics, the
    per-row-tile partials and ``W_down @ [w, b]``. Counted as in the test above."""
    monkeypatch.setenv("LOPT_RECON_GEMMS", "triton")
    rows, h, r = 200, 96, 24
    workspace, loss, grads, y, x, params = _workspace_of_one_call(rows, h, r)
    ref_loss, ref_grads = reference(y, x, params)
    assert_matches(loss, grads, ref_loss, ref_grads, torch.float32, params, y)

    block_m, block_n = rl_driver._gemm_config("act_grad", torch.float32)[:2]
    term_tiles, row_tiles = -(-r // block_n), -(-rows // block_m)
    loss_tiles = -(-h // rl_driver._gemm_config("up_error", torch.float32)[1])
    partials = 4 * row_tiles * (3 * rl_driver._round_up(h, 32) + rl_driver._round_up(r, 32) + rl_driver._round_up(loss_tiles, 32))
    bound = rows * (2 * h + 2 * r) * 4 + 8 * rows + 8 * term_tiles * rows + partials + 4 * 2 * h + 4 * 2 * r + 64
    print(f"workspace {workspace:,} B, bound {bound:,} B")
    assert workspace <= bound, (workspace, bound)
    assert workspace + 4 * rows * h > bound  # tight: one more m x h fp32 buffer (a stored reconstruction) would not fit
    torch.testing.assert_close(loss, reference(y, x, params)[0], rtol=1e-4, atol=1e-5)


def test_weight_gradients_accumulate_in_place_where_addmm_has_out_dtype(monkeypatch):
    """Where the runtime's addmm takes ``out_dtype`` (CUDA), bf16 weight-gradient products go straight into
    the fp32 accumulators (``out=acc``, no h x r temporary). CPU torch has no such kernel: the probe is
    forced on and addmm stands in for it (fp32 product added into ``out``), checking the wiring and numerics."""
    calls = []
    real_addmm = torch.addmm

    def addmm(input, mat1, mat2, *, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return real_addmm(input, mat1, mat2, out=out, **kwargs)
        assert out is input and out.dtype == out_dtype == torch.float32 and mat1.dtype == torch.bfloat16
        beta = kwargs.get("beta", 1)
        calls.append((tuple(out.shape), beta))
        product = mat1.float() @ mat2.float()
        return out.copy_(product) if beta == 0 else out.add_(product)  # beta = 0 ignores out, NaNs included

    monkeypatch.setattr(rl_driver, "_addmm_has_out_dtype_in_place", lambda device_type, dtype: True)
    monkeypatch.setattr(torch, "addmm", addmm)
    y, x, params = make_inputs(37, torch.bfloat16)
    ref_loss, ref_grads = reference(y, x, params, scale=SCALE)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, grad_scale=SCALE, backend="triton", chunk_rows=16)
    # two accumulators, three chunks: the first writes the uninitialised accumulators, the others add
    assert calls == [((H, R), 0), ((R, H), 0)] + [((H, R), 1), ((R, H), 1)] * 2
    assert_matches(loss, grads, ref_loss, ref_grads, torch.bfloat16, params, y)


@interpreter_only
@pytest.mark.parametrize("compute_grads", [True, False])
@pytest.mark.parametrize("gemms", ["cublas", "triton"])
def test_launches_per_call_are_the_chunks_kernels_plus_five(monkeypatch, compute_grads, gemms):
    """Host overhead: one call launches, per chunk, the five Triton kernels and the six matmuls (two forward,
    four backward; the loss alone: three kernels, two matmuls), and besides them only five kernels: one fill of the per-program
    partials, the gradient coefficient, one sum over the partials, the loss, one multi-tensor copy casting the
    gradients (three with the loss only: the fill, the sum and the loss). Before, the partials, the accumulators and the
    loss had a fill each and every gradient its own sum and cast: 18 more launches per call.

    Counted on CPU tensors: every ATen op that runs a kernel (views and allocations excluded) and every Triton
    launch; each weight-gradient accumulation counts once, as the in-place ``addmm`` on CUDA."""
    from torch.utils._python_dispatch import TorchDispatchMode

    no_kernel = {"empty", "empty_strided", "view", "slice", "t", "transpose", "reshape", "_unsafe_view", "alias",
                 "as_strided", "detach", "expand", "select", "unsqueeze", "lift_fresh"}
    launches, paused = [], []

    class Launches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in no_kernel and not paused:
                launches.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def counted_once(name, fn):
        def run(*args, **kwargs):
            launches.append(name)
            paused.append(True)  # the interpreter's (and the CPU fallback's) own tensor ops are not launches
            try:
                return fn(*args, **kwargs)
            finally:
                paused.pop()
        return run

    class CountedKernel:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            return counted_once(self.name, self.kernel[grid])

    kernels = [name for name in dir(rl_driver) if name.endswith("_kernel")]
    for name in kernels:
        monkeypatch.setattr(rl_driver, name, CountedKernel(getattr(rl_driver, name), name))
    monkeypatch.setattr(rl_driver, "_accumulate_mm", counted_once("accumulate_mm", rl_driver._accumulate_mm))
    monkeypatch.setenv("LOPT_RECON_GEMMS", gemms)
    y, x, params = make_inputs(37, torch.float32 if gemms == "triton" else torch.bfloat16)
    chunks = 3  # 16 + 16 + 5 rows
    with Launches():
        rl_op._run_impl(y, x, params, EPS, SCALE, compute_grads, "triton", 16)
    if gemms == "cublas":
        per_chunk = 11 if compute_grads else 5
        per_call = 5 if compute_grads else 3
    else:  # the LayerNorm forward, four epilogue GEMMs and the two weight-gradient matmuls (the loss alone: three);
        # per call also W_down @ [w, b] (a stack and a matmul; fp32 here, as with out_dtype on CUDA), and with the
        # gradients the loss is one more sum (over its partial columns, one per column tile of h) and the down weight's
        # LayerNorm-bias term one outer-product update
        per_chunk = 7 if compute_grads else 3
        per_call = 9 if compute_grads else 5
    assert len(launches) == per_chunk * chunks + per_call, str(launches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_alone_equals_the_loss_with_gradients(backend):
    """The loss-only call (``compute_grads=False``) runs the same arithmetic as the call with gradients: fp16
    decoder, so every stored intermediate is rounded. Before, the epilogue-GEMM path's loss-only down projection
    rounded proj to its fp32 placeholder's dtype, not fp16 (1.49774885 against 1.4977572)."""
    y, x, params = make_inputs(65, torch.float16, h=130, r=33)
    alone, _ = reconstruction_loss_and_grads(y, x, *params, backend=backend, chunk_rows=16, compute_grads=False)
    with_grads, _ = reconstruction_loss_and_grads(y, x, *params, backend=backend, chunk_rows=16)
    assert torch.equal(alone, with_grads), (float(alone), float(with_grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_bias_much_larger_than_its_weight(backend):
    """bf16, LayerNorm weight ~0.05 and bias ~N(0, 3): grad_y within the bf16 tolerance. Before, the epilogue-GEMM
    path formed the LayerNorm backward's row term as d_z . (proj - W_down b), a difference of two large stored
    values: grad_y's error was 2.9e-2 of its largest entry (the default path's 7.3e-3)."""
    y, x, params = make_inputs(65, torch.bfloat16, h=130, r=33, seed=3)
    g = torch.Generator().manual_seed(4)
    params[0] = (0.05 + 0.01 * torch.randn(130, generator=g)).to(DEVICE, torch.bfloat16)
    params[1] = (3.0 * torch.randn(130, generator=g)).to(DEVICE, torch.bfloat16)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, backend=backend, chunk_rows=16)
    ref_loss, ref_grads = reference(y, x, params)
    assert_matches(loss, grads, ref_loss, ref_grads, torch.bfloat16, params, y)


@interpreter_only
def test_fp16_matmuls_keep_d_recon_out_of_the_subnormals():
    """fp16 decoder on the Triton path: d_recon = 2 (recon - x) / (N h) is stored in fp16 for the matmuls; at
    N h = 2^20 it is ~2e-6, in fp16's subnormals (below 6.1e-5, 10 bits lost). A power-of-two storage scale keeps it
    normal: grad_y's error is within 2.5x the fp32-throughout torch backend's (before: 4.9x, 3.75e-3 against
    7.6e-4 of the largest entry)."""
    rows, h, r = 16384, 64, 16
    y, x, params = make_inputs(rows, torch.float16, h=h, r=r)
    _, ref_grads = reference(y, x, params)

    def errors(backend):
        _, grads = reconstruction_loss_and_grads(y, x, *params, backend=backend, chunk_rows=4096)
        return [((g.float() - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, ref_grads)]

    fused, torch_backend = errors("triton"), errors("torch")
    print(f"fp16, N h = 2^20, error / largest entry: grad_y {fused[0]:.3g} (torch backend {torch_backend[0]:.3g}), "
          f"norm weight {fused[1]:.3g} ({torch_backend[1]:.3g})")
    assert fused[0] <= 2.5 * torch_backend[0] and fused[1] <= 2.5 * torch_backend[1], (fused, torch_backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_weight_gradient_product_of_a_chunk_stays_finite(backend):
    """fp16 decoder, a target channel 4000 away from the reconstruction (a massive activation, untrained decoder):
    d_recon is stored times 2^-exponent of its coefficient (diff / 8 to diff / 4, not 2 diff / (N h)), so a chunk's
    up-weight product d_recon^T @ act sums 128 rows of ~-500 * act (~-2000 * act before the storage scale's
    mantissa moved from [1/2, 1) to [1/8, 1/4)). Where the runtime has no fp32-output matmul
    (CPU; CUDA torch without mm's out_dtype) that product was rounded to fp16 before the fp32 accumulation: ~-1e5,
    inf (before: grad_up_weight inf in row 0 on both Triton paths, every other gradient finite)."""
    rows, h, r = 128, 8, 3
    y, x, params = make_inputs(rows, torch.float16, h=h, r=r)
    x = x.clone()
    x[:, 0] += 4000.0
    ref_loss, ref_grads = reference(y, x, params)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, backend=backend, chunk_rows=rows)
    finite = {name: bool(torch.isfinite(t).all()) for name, t in zip(GRAD_NAMES, grads)}
    assert all(finite.values()), finite
    assert_matches(loss, grads, ref_loss, ref_grads, torch.bfloat16, params, y)


@pytest.mark.parametrize("grad_scale", [1.0, 1e-3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_d_recon_storage_scale_keeps_targets_near_the_fp16_max_finite(backend, grad_scale):
    """fp16 decoder, values near the edge of fp16's range: a target channel at 60000 with an up bias of -30000 makes
    recon - x ~ -90000 in fp32. The Triton paths store d_recon in fp16 as diff times the mantissa of its coefficient
    2 grad_scale / (N h), which lies in [0.5, 1). At grad_scale 1e-3 (N h = 90) the mantissa is 0.728, the stored
    value -65500 rounds to -inf, and every gradient downstream of d_recon became inf or NaN although the fp32
    reference is finite (up to ~18). The mantissa now lies in [0.125, 0.25), so diff's largest possible fp32 value
    (3 x 65504) still fits."""
    rows, h, r = 9, 10, 3
    y, x, params = make_inputs(rows, torch.float16, h=h, r=r)
    x = x.clone()
    x[:, 0] = 60000.0
    params[5] = params[5].clone()
    params[5][0] = -30000.0
    ref_loss, ref_grads = reference(y, x, params, grad_scale)
    loss, grads = reconstruction_loss_and_grads(y, x, *params, grad_scale=grad_scale, backend=backend)
    finite = {name: bool(torch.isfinite(t).all()) for name, t in zip(GRAD_NAMES, grads)}
    assert all(finite.values()), finite
    assert_matches(loss, grads, ref_loss, ref_grads, torch.bfloat16, params, y)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_constant_rows_far_from_zero_normalise_to_the_layer_norm_bias(backend):
    """fp32 rows that are constant (LayerNorm input variance 0) at 1e4-2e4: xhat is 0, the LayerNorm output its bias.
    The row mean as sum / h was off by up to an ulp of the row value (~1e-3), which the variance then saw as spread:
    var ~ 1e-6 against eps 1e-5 gave xhat ~ 0.3 (before, on both Triton paths: loss off by 7.9e-3 relative, grad_y by
    0.46 of its largest entry against the fp64 reference; now 6e-9 and 2e-7). A second pass adds mean(y - mean).
    Against fp64: ATen's fp32 LayerNorm backward (the torch backend, ``reference``) is 7e-3 off here itself."""
    y, x, params = make_inputs(6, torch.float32)
    g = torch.Generator().manual_seed(1)
    y = (1e4 * (1 + torch.rand(6, 1, generator=g))).expand(6, H).contiguous().to(DEVICE)
    yd = y.double().requires_grad_()
    pd = [p.double().requires_grad_() for p in params]
    normed = F.layer_norm(yd, (H,), pd[0], pd[1], EPS)
    ref_loss = ((F.linear(F.gelu(F.linear(normed, pd[2], pd[3])), pd[4], pd[5]) - x.double()) ** 2).mean()
    ref_grads = torch.autograd.grad(ref_loss * SCALE, [yd, *pd])
    loss, grads = reconstruction_loss_and_grads(y, x, *params, grad_scale=SCALE, backend=backend)
    assert_matches(loss, grads, ref_loss.detach().float(), [g.float() for g in ref_grads], torch.float32, params, y)
