"""Benchmark: fused reconstruction loss vs eager PyTorch vs torch.compile (forward + backward).

Run with ``pytest bench/test_bench_reconstruction_loss.py --benchmark-only``. The three variants run in
one pytest-benchmark group, so their timings print side by side; each records its peak memory in
``benchmark.extra_info`` and a one-line ratio summary is printed at the end of the session.

Shapes: on CUDA rows=16384, h=4096, bf16 (fused = Triton backend); on CPU rows=4096, h=1024, fp32
(fused = the chunked torch backend, backend="auto"). The decoder bottleneck is r = h // 4. Override
with LOPT_BENCH_ROWS / LOPT_BENCH_HIDDEN / LOPT_BENCH_RANK / LOPT_BENCH_ROUNDS.

Peak memory of one forward+backward step, excluding the inputs (which exist before the step):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the bytes
  allocated before the step (the inputs);
- CPU: ``torch.profiler`` with ``profile_memory=True``: every allocation / free of the CPU allocator is
  a ``[memory]`` event with a signed byte count; the peak of their running sum in time order is the
  step's peak extra memory (deterministic for a given sequence of allocations).
In both cases the parameter and ``y`` gradients the step leaves behind are part of the figure.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lopt_kernels.ops.reconstruction_loss import reconstruction_loss

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
        _compiled_loss = torch.compile(eager_loss)
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


class _SummaryPlugin:
    """Prints the fused-vs-eager ratios at the end of the session (no ``-s`` needed)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _RESULTS:
            return
        terminalreporter.write_sep("-", "reconstruction loss: fused vs eager vs torch.compile")
        terminalreporter.write_line(summary_line())


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
    reset()
    peak = _peak_extra_bytes(step)
    benchmark.extra_info.update(
        impl=impl, device=DEVICE.type, dtype=str(DTYPE), rows=ROWS, hidden=HIDDEN, rank=RANK,
        peak_bytes=peak, peak_mib=round(peak / 2**20, 2), memory_method=MEMORY_METHOD,
    )
    benchmark.pedantic(step, setup=reset, rounds=ROUNDS, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    time_s = stats.stats.median if stats is not None else None
    _RESULTS[impl] = {"time_s": time_s, "peak_bytes": peak}
    if impl == "compiled" and "fused" in _RESULTS and "eager" in _RESULTS:
        benchmark.extra_info["summary"] = summary_line()
