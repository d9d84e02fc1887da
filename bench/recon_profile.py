"""Where the fused reconstruction loss's time goes: kernels, host overhead, and the two ways it is timed.

    python bench/recon_profile.py --out profile.json      # CUDA: rows 16384, bf16, h 4096 and 8192, r = h / 4

For each hidden size, one process measures forward + backward (loss and every gradient) of ``fused`` (the Triton
op through its autograd Function, as a training step and ``bench/test_bench_reconstruction_loss.py`` call it),
``fused_direct`` (``reconstruction_loss_and_grads``, as ``bench/recon_sweep.py`` times it), ``eager`` and
``compiled``, and ``fused_triton_gemms`` (``fused`` on the epilogue-GEMM path, ``LOPT_RECON_GEMMS=triton``: its
kernel table against ``fused``'s is each epilogue GEMM against the cuBLAS GEMM and row kernel it replaces):
- ``step_ms``: wall time of one synchronised step (perf_counter around the call and a device synchronise, as the
  pytest benchmark times it), the variants interleaved round by round so that none is favoured by running after
  the device has warmed up; ``do_bench_ms``: ``triton.testing.do_bench`` (CUDA events, L2 flushed), same process;
- ``host_ms``: how long the call takes to return without a synchronise (launch and Python overhead; equal to the
  step time when the device waits on the host), and ``syncs``: the host synchronisations the call makes (CUDA
  sync debug mode);
- ``kernels``: per-call device time of every kernel (``torch.profiler``), largest first, their sum ``busy_ms`` and
  ``launches``; ``step_ms - busy_ms`` is the time the device is idle inside a step.
On CPU (a check that the script runs) it profiles a tiny shape under the Triton interpreter, CPU times only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import torch  # noqa: E402
import triton  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lopt_kernels.ops.reconstruction_loss import reconstruction_loss, reconstruction_loss_and_grads  # noqa: E402
from recon_check import interleaved_ms  # noqa: E402
from recon_sweep import device_and_shapes, make_inputs, with_gemm_path  # noqa: E402
from test_bench_reconstruction_loss import EPS, eager_loss  # noqa: E402 - the benchmark's own reference


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def variants(y, x, params, backend: str, compile_baseline: bool) -> dict:
    """name -> a zero-argument step doing one forward + backward."""
    def autograd(loss_fn):
        def step():
            loss_fn(y, x, *params).backward()
        return step

    steps = {
        "fused": autograd(lambda *a: reconstruction_loss(*a, eps=EPS, backend=backend)),
        "fused_direct": lambda: reconstruction_loss_and_grads(y, x, *params, eps=EPS, backend=backend),
        "eager": autograd(eager_loss),
    }
    if backend == "triton":  # the epilogue GEMMs: their kernel table sets each one beside the cuBLAS GEMM it replaces
        steps["fused_triton_gemms"] = with_gemm_path("triton", steps["fused"])
    if compile_baseline:
        torch._dynamo.reset()  # nothing compiled for another shape: no automatic dynamic shapes
        steps["compiled"] = autograd(torch.compile(eager_loss, dynamic=False))
    return steps


def _kernel_table(step, leaves, cuda: bool, calls: int) -> dict:
    """Per-call device (CUDA) or CPU time of every op the step runs, from ``torch.profiler``."""
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    for t in leaves:
        t.grad = None
    _sync(cuda)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            for t in leaves:
                t.grad = None
            step()
        _sync(cuda)
    rows = []
    for evt in prof.key_averages():
        if cuda:
            own = getattr(evt, "self_device_time_total", None)
            own = getattr(evt, "self_cuda_time_total", 0) if own is None else own
            if not own or evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            own = evt.self_cpu_time_total
            if not own:
                continue
        rows.append({"name": evt.key[:120], "count_per_call": evt.count / calls, "us_per_call": own / calls})
    rows.sort(key=lambda row: -row["us_per_call"])
    return {"busy_ms": sum(row["us_per_call"] for row in rows) / 1e3,
            "launches": sum(row["count_per_call"] for row in rows) if cuda else None, "kernels": rows[:40]}


def _host_and_syncs(step, leaves, cuda: bool, reps: int) -> dict:
    host, syncs = [], 0
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        _sync(cuda)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            started = time.perf_counter()
            try:
                step()
                host.append((time.perf_counter() - started) * 1e3)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = max(syncs, sum("synchroniz" in str(w.message) for w in caught))
        _sync(cuda)
    return {"host_ms": statistics.median(host), "syncs": syncs}


def profile_shape(rows, h, r, dtype, device, compile_baseline=True, rounds=20, calls=5) -> dict:
    cuda = device.type == "cuda"
    backend = "triton"
    y, x, params = make_inputs(rows, h, r, dtype, device)
    leaves = [y, *params]
    steps = variants(y, x, params, backend, compile_baseline)
    result = {"rows": rows, "hidden": h, "rank": r, "dtype": str(dtype).removeprefix("torch."), "variants": {}}
    try:  # the epilogue-GEMM path is new: its failure must not cost the other variants' profiles
        steps["fused_triton_gemms"]()
    except Exception as exc:  # noqa: BLE001 - recorded, the variant dropped
        steps.pop("fused_triton_gemms")
        result["fused_triton_gemms_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    times = interleaved_ms(steps, leaves, cuda, rounds)
    for name, step in steps.items():
        record = {"step_ms": statistics.median(times[name])}
        if cuda:
            record["do_bench_ms"] = float(triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=leaves))
        record.update(_host_and_syncs(step, leaves, cuda, reps=max(3, rounds // 4)))
        record.update(_kernel_table(step, leaves, cuda, calls))
        if cuda:
            record["idle_ms"] = record["step_ms"] - record["busy_ms"]
        result["variants"][name] = record
        print(f"h={h} {name}: " + json.dumps({k: v for k, v in record.items() if k != "kernels"}), flush=True)
        for row in record["kernels"][:12]:
            print(f"    {row['us_per_call']:9.1f} us  x{row['count_per_call']:<5g} {row['name']}", flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="recon_profile.json")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    device, dtype, rows, hiddens = device_and_shapes(args)
    cuda = device.type == "cuda"
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (Triton interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "results": []}
    for h in hiddens:
        out["results"].append(profile_shape(rows, h, h // 4, dtype, device, compile_baseline=not args.no_compile,
                                            rounds=args.rounds or (20 if cuda else 2)))
        with open(args.out, "w") as f:  # written after each size, so a time-out keeps what finished
            json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
