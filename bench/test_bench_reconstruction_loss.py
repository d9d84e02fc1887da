"""Benchmark: fused reconstruction loss vs eager PyTorch vs torch.compile (forward + backward).

Run with ``pytest bench/test_bench_reconstruction_loss.py --benchmark-only``. The three variants run in
one pytest-benchmark group, so their timings print side by side; each records its peak memory in
``benchmark.extra_info`` and a one-line ratio summary is printed at the end of the session.

Shapes: on CUDA rows=16384, h=4096, bf16 (fused = Triton backend); on CPU rows=4096, h=1024, fp32
(fused = the chunked torch backend, backend="auto"). The decoder bottleneck is r = h // 4. Override
with LOPT_BENCH_ROWS / LOPT_BENCH_HIDDEN / LOPT_BENCH_RANK / LOPT_BENCH_ROUNDS.

On CUDA the device is kept busy for a second before each variant's measurement, so that the variant timed first
does not run on a device still below its working clocks.

Peak memory of one forward+backward step, excluding the inputs (which exist before the step):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the bytes
  allocated before the step (the inputs);
- CPU: ``torch.profiler`` with ``profile_memory=True``: every allocation / free of the CPU allocator is
  a ``[memory]`` event with a signed byte count; the peak of their running sum in time order is the
  step's peak extra memory (deterministic for a given sequence of allocations).
In both cases the parameter and ``y`` gradients the step leaves behind are part of the figure.

Next to the times, the summary prints a modelled HBM traffic per row (``modelled_hbm_bytes_per_row``) for
the fused Triton path, the eager autograd graph and the limit (read y and x once, write grad_y once),
counted from the buffers each one reads and writes at the benchmarked shape, dtype and chunk size. It is
a model (every operand read once per op, weights and accumulators per chunk amortised over its rows),
not a measurement; on CPU the fused *timing* is the chunked torch backend while the model is the
Triton path's.
"""

from __future__ import annotations

import importlib
import os
import time

import pytest
import torch
import torch.nn.functional as F

from lopt_kernels.ops.reconstruction_loss import default_chunk_rows, reconstruction_loss

_rl = importlib.import_module("lopt_kernels.ops.reconstruction_loss.triton_driver")  # the model reads its probes

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROWS = int(os.environ.get("LOPT_BENCH_ROWS", 16384 if CUDA else 4096))
HIDDEN = int(os.environ.get("LOPT_BENCH_HIDDEN", 4096 if CUDA else 1024))
RANK = int(os.environ.get("LOPT_BENCH_RANK", HIDDEN // 4))
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = int(os.environ.get("LOPT_BENCH_ROUNDS", 20 if CUDA else 10))
EPS = 1e-5
MEMORY_METHOD = (
    "cuda max_memory_allocated - allocated before the step" if CUDA
    else "torch.profiler profile_memory: peak running sum of CPU allocator events"
)

_RESULTS: dict[str, dict] = {}


def eager_loss(y, x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias):
    """The unfused reference: LayerNorm -> Linear -> GELU -> Linear, fp32 mean squared error."""
    normed = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, EPS)
    recon = F.linear(F.gelu(F.linear(normed, down_weight, down_bias)), up_weight, up_bias)
    return F.mse_loss(recon.float(), x.float())


def fused_loss(y, x, *params):
    return reconstruction_loss(y, x, *params, eps=EPS)  # backend="auto": Triton on CUDA, torch on CPU


_compiled_loss = None


def compiled_loss(*args):
    global _compiled_loss
    if _compiled_loss is None:
        _compiled_loss = torch.compile(eager_loss, dynamic=False)  # one shape per process: static, as tuned
    return _compiled_loss(*args)


LOSSES = {"fused": fused_loss, "eager": eager_loss, "compiled": compiled_loss}


def _make_inputs():
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale + shift).to(device=DEVICE, dtype=DTYPE)
        return t.requires_grad_(grad)

    y = rand(ROWS, HIDDEN)
    x = rand(ROWS, HIDDEN, grad=False)
    params = [
        rand(HIDDEN, scale=0.1, shift=1.0), rand(HIDDEN, scale=0.1),
        rand(RANK, HIDDEN, scale=HIDDEN**-0.5), rand(RANK, scale=0.1),
        rand(HIDDEN, RANK, scale=RANK**-0.5), rand(HIDDEN, scale=0.1),
    ]
    return y, x, params


def _warm_device(seconds: float = 1.0) -> None:
    """Keep the GPU busy with bf16 matmuls for ``seconds``: an idle GPU runs its first milliseconds of work at lower
    clocks, which would favour whichever variant is timed later."""
    a = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def _peak_extra_bytes(step) -> int:
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def modelled_hbm_bytes_per_row(rows, h, r, dtype, device_type) -> dict[str, float]:
    """Modelled HBM bytes per row of one forward + backward: ``fused`` (the Triton path), ``eager`` (the
    autograd graph of ``eager_loss``), ``limit`` (y and x read once, grad_y written once).

    ``s`` is the rows' and parameters' element size (the benchmark uses one dtype for both, which is also
    the fused path's matmul dtype). Row-wise traffic is counted per op, each operand read once; weights,
    fp32 weight-gradient accumulators and the final casts are per chunk / per step, divided by the rows.
    """
    s = torch.empty((), dtype=dtype).element_size()
    m = min(rows, default_chunk_rows(rows, h, r))
    chunks = -(-rows // m)

    # Fused (reconstruction_loss._triton_chunks), per row of a chunk:
    #   ln_forward     read y (h s), write normed (h s), mean + rstd (8)
    #   mm down        read normed (h s), write proj (r s)
    #   bias_gelu      read proj (r s), write act (r s)
    #   mm up          read act (r s), write recon (h s)
    #   squared_error  read recon (h s) and x (h s), write d_recon (h s)
    #   dW_up += ...   read d_recon (h s), act (r s)
    #   d_act = ...    read d_recon (h s), write d_act into act (r s)
    #   gelu_backward  read d_act (r s), proj (r s), write d_z (r s)
    #   dW_down += ... read d_z (r s), normed (h s)
    #   d_normed = ... read d_z (r s), write d_normed into recon (h s)
    #   ln_backward    read d_normed (h s), y (h s), mean + rstd (8), write grad_y (h s)
    fused_rows = (4 * h * s) + (10 * h * s) + (11 * r * s) + 16  # y/x/grad_y + normed/recon chain + r-wide + stats
    # per chunk: W_down and W_up read twice each (fwd, bwd); each fp32 accumulator update
    if dtype == torch.float32 or _rl._addmm_has_out_dtype_in_place(device_type, dtype):
        acc_update = 2 * 4 * h * r  # addmm into acc in place: read + write acc
    elif _rl._mm_has_out_dtype(device_type):
        acc_update = 4 * 4 * h * r  # fp32 product written + read, acc read + written
    else:
        acc_update = (2 + 2 + 8) * h * r  # product in the matmul dtype written + read, acc read + written
    fused_chunk = 4 * h * r * s + 2 * acc_update
    # the accumulators read once and cast to the parameters' dtype, less the first chunk's read of them (beta = 0)
    fused_step = 2 * h * r * (4 + s) - 2 * 4 * h * r
    fused = fused_rows + (chunks * fused_chunk + fused_step) / rows

    # Eager autograd graph (F.layer_norm, F.linear x2, F.gelu, .float(), F.mse_loss and their backwards):
    #   forward   LN: read y, write normed (2 h s) + stats (8); down: read normed (h s), write z (r s);
    #             gelu: read z, write a (2 r s); up: read a (r s), write recon (h s);
    #             bf16 only: recon.float() and x.float() (read 2 h s, write 8 h); mse: read both (8 h or 2 h s)
    #   backward  mse: read recon_f, x_f, write grad (12 h or 3 h s); bf16: grad to bf16 (read 4 h, write h s);
    #             up: grad_a (read g h s, write r s), grad W_up (read g h s, a r s), grad b_up (read g h s);
    #             gelu: read grad_a, z, write (3 r s); down: grad_normed (read r s, write h s),
    #             grad W_down (read r s, normed h s), grad b_down (read r s); LN: read grad_normed, y,
    #             stats, write grad_y (3 h s + 8)
    if s == 4:
        eager_h = (4 + 2) + (3 + 3 + 2 + 3)  # 17 h s
        eager_rows = eager_h * h * s
    else:
        eager_rows = (4 * h * s + 2 * h * s + 8 * h + 8 * h) + (12 * h + 4 * h + h * s + 3 * h * s + 2 * h * s + 3 * h * s)
    eager_rows += 12 * r * s + 16
    eager_step = 6 * h * r * s  # weights read fwd + bwd, weight gradients written
    eager = eager_rows + eager_step / rows

    limit = 3 * h * s + 4 * h * r * s / rows  # y, x, grad_y; weights read and their gradients written once
    return {"fused": fused, "eager": eager, "limit": limit, "chunk_rows": m}


def hbm_model_line() -> str:
    model = modelled_hbm_bytes_per_row(ROWS, HIDDEN, RANK, DTYPE, DEVICE.type)
    return (
        f"modelled HBM bytes/row (Triton path, chunk {model['chunk_rows']} rows): fused {model['fused']:.0f}, "
        f"eager {model['eager']:.0f}, limit {model['limit']:.0f} "
        f"(fused/limit {model['fused'] / model['limit']:.2f}x, eager/limit {model['eager'] / model['limit']:.2f}x)"
    )


class _SummaryPlugin:
    """Prints the fused-vs-eager ratios at the end of the session (no ``-s`` needed)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _RESULTS:
            return
        terminalreporter.write_sep("-", "reconstruction loss: fused vs eager vs torch.compile")
        terminalreporter.write_line(summary_line())
        terminalreporter.write_line(hbm_model_line())


def summary_line() -> str:
    head = (
        f"fwd+bwd on {DEVICE.type} {str(DTYPE).removeprefix('torch.')} rows={ROWS} h={HIDDEN} r={RANK}: "
    )
    parts = []
    for name in ("fused", "eager", "compiled"):
        res = _RESULTS.get(name)
        if res is None:
            continue
        time_s = f"{res['time_s'] * 1e3:.1f} ms" if res["time_s"] is not None else "n/a"
        parts.append(f"{name} {time_s} / {res['peak_bytes'] / 2**20:.1f} MiB")
    ratios = []
    fused = _RESULTS.get("fused")
    for other in ("eager", "compiled"):
        res = _RESULTS.get(other)
        if fused is None or res is None:
            continue
        t = (
            f"{fused['time_s'] / res['time_s']:.2f}x time"
            if fused["time_s"] is not None and res["time_s"]
            else "time n/a"
        )
        m = f"{fused['peak_bytes'] / res['peak_bytes']:.2f}x memory" if res["peak_bytes"] else "memory n/a"
        ratios.append(f"fused/{other} = {t}, {m}")
    return head + "; ".join(parts) + " | " + "; ".join(ratios)


@pytest.fixture(scope="module", autouse=True)
def _register_summary(request):
    manager = request.config.pluginmanager
    name = "lopt-reconstruction-loss-bench-summary"
    if not manager.has_plugin(name):
        manager.register(_SummaryPlugin(), name)
    yield


@pytest.mark.benchmark(group="reconstruction_loss_fwd_bwd")
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_reconstruction_loss_fwd_bwd(benchmark, impl):
    y, x, params = _make_inputs()
    loss_fn = LOSSES[impl]
    leaves = (y, *params)

    def reset():
        for t in leaves:
            t.grad = None

    def step():
        loss = loss_fn(y, x, *params)
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()

    reset()
    step()  # compiles / autotunes outside both measurements
    if CUDA:  # the device at its working clocks before the first timed step, whichever variant runs first
        _warm_device()
    reset()
    peak = _peak_extra_bytes(step)
    benchmark.extra_info.update(
        impl=impl, device=DEVICE.type, dtype=str(DTYPE), rows=ROWS, hidden=HIDDEN, rank=RANK,
        peak_bytes=peak, peak_mib=round(peak / 2**20, 2), memory_method=MEMORY_METHOD,
        modelled_hbm_bytes_per_row=modelled_hbm_bytes_per_row(ROWS, HIDDEN, RANK, DTYPE, DEVICE.type)[impl]
        if impl in ("fused", "eager") else None,
    )
    benchmark.pedantic(step, setup=reset, rounds=ROUNDS, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    time_s = stats.stats.median if stats is not None else None
    _RESULTS[impl] = {"time_s": time_s, "peak_bytes": peak}
    if impl == "compiled" and "fused" in _RESULTS and "eager" in _RESULTS:
        benchmark.extra_info["summary"] = summary_line()
