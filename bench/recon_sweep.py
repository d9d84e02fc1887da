"""Sweep the fused reconstruction loss's tunables, timed side by side with eager PyTorch and torch.compile.

    python bench/recon_sweep.py --out sweep.json        # CUDA: rows 16384, bf16, h 4096 and 8192, r = h / 4

For each hidden size, one process times forward + backward (loss and every gradient) of
- ``eager``: LayerNorm -> Linear -> GELU -> Linear -> fp32 MSE and ``backward()`` (bench/test_bench_reconstruction_loss.py's
  reference), and ``compiled``: the same under ``torch.compile``;
- the fused Triton op for every combination of
  ``chunk``: rows per chunk (``8M/h``: about 8M elements per chunk-by-hidden buffer, the rule before issue 11;
  ``default``: ``default_chunk_rows`` with the rank, ``max(8M / h, min(4 r, 32M / h))``; ``grown``:
  ``max(8M / h, min(4 r, 64M / h))``; ``all``: one chunk),
  ``partials``: programs per SM of the kernels that keep per-program partial sums (``--partials``, default 1 2),
  ``max_warps``: the widest CTA of the row-wise kernels (``--warps``, default 16), and
  ``gemms``: the Triton backend's matmul path (``--gemms``, default cublas triton: ``LOPT_RECON_GEMMS``; the
  epilogue-GEMM path keeps no per-program partials, so it runs with the first ``--partials`` value only).
Times are ``triton.testing.do_bench`` medians (CUDA events, L2 flushed between repetitions); peak memory is
``max_memory_allocated`` over one call minus what was allocated before it (the returned gradients included,
as eager's ``.grad``). On CPU (a check that the script runs) it sweeps a tiny shape under the Triton interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import torch  # noqa: E402
import triton  # noqa: E402

from lopt_kernels.ops.reconstruction_loss import default_chunk_rows, reconstruction_loss_and_grads  # noqa: E402
from test_bench_reconstruction_loss import EPS, eager_loss  # noqa: E402 - the benchmark's own reference

_rl = importlib.import_module("lopt_kernels.ops.reconstruction_loss.triton_driver")


def with_gemm_path(path: str, fn):
    """``fn`` run with ``LOPT_RECON_GEMMS=path`` (the Triton backend's matmul path, read per call)."""
    def run(*args, **kwargs):
        saved = os.environ.get("LOPT_RECON_GEMMS")
        os.environ["LOPT_RECON_GEMMS"] = path
        try:
            return fn(*args, **kwargs)
        finally:
            if saved is None:
                del os.environ["LOPT_RECON_GEMMS"]
            else:
                os.environ["LOPT_RECON_GEMMS"] = saved
    return run


def grown_chunk_rows(num_rows: int, hidden: int, rank: int) -> int:
    """Chunk rows that grow with h: at least ``default_chunk_rows``, up to 4 r rows (weights re-read once per
    4 r rows) while one chunk-by-hidden buffer stays <= 64M elements."""
    grown = max((8 << 20) // hidden, min(4 * rank, (64 << 20) // hidden))
    return max(1, min(num_rows, grown))


def make_inputs(rows, h, r, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype).requires_grad_(grad)

    y, x = rand(rows, h), rand(rows, h, grad=False)
    params = [rand(h, scale=0.1, shift=1.0), rand(h, scale=0.1), rand(r, h, scale=h**-0.5), rand(r, scale=0.1),
              rand(h, r, scale=r**-0.5), rand(h, scale=0.1)]
    return y, x, params


def _time_ms(fn, leaves, cuda: bool, reps: int) -> float:
    if cuda:
        return float(triton.testing.do_bench(fn, warmup=5, rep=max(20, reps * 5), grad_to_none=leaves))
    times = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _peak_bytes(fn, leaves, cuda: bool) -> int | None:
    if not cuda:
        return None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def sweep(rows, h, r, dtype, device, compile_baseline=True, reps=10, partials_grid=(1, 2), warps_grid=(16,),
          gemms_grid=("cublas", "triton")) -> dict:
    cuda = device.type == "cuda"
    y, x, params = make_inputs(rows, h, r, dtype, device)
    leaves = [y, *params]
    result = {"rows": rows, "hidden": h, "rank": r, "dtype": str(dtype).removeprefix("torch."), "baselines": {},
              "fused": []}

    def autograd_step(loss_fn):
        def step():
            loss = loss_fn(y, x, *params)
            loss.backward()
            return loss
        return step

    baselines = {"eager": eager_loss}
    if compile_baseline:
        torch._dynamo.reset()  # nothing compiled for another shape: no automatic dynamic shapes
        baselines["compiled"] = torch.compile(eager_loss, dynamic=False)
    for name, loss_fn in baselines.items():
        step = autograd_step(loss_fn)
        step()  # compiles outside the measurement
        result["baselines"][name] = {"ms": _time_ms(step, leaves, cuda, reps), "peak_bytes": _peak_bytes(step, leaves, cuda)}
        print(f"h={h} {name}: {result['baselines'][name]}", flush=True)

    chunks = {"8M/h": min(rows, default_chunk_rows(rows, h)), "default": default_chunk_rows(rows, h, r),
              "grown": grown_chunk_rows(rows, h, r), "all": rows}
    saved = (_rl._PARTIAL_PROGRAMS_PER_SM, _rl._MAX_WARPS)
    try:
        grid = itertools.product(gemms_grid, chunks.items(), partials_grid, warps_grid)
        for gemms, (chunk_name, chunk), partials, max_warps in grid:
            if gemms == "triton" and partials != partials_grid[0]:
                continue  # the epilogue-GEMM path keeps no per-program partials
            _rl._PARTIAL_PROGRAMS_PER_SM, _rl._MAX_WARPS = partials, max_warps

            def fused(chunk=chunk):
                return reconstruction_loss_and_grads(y, x, *params, eps=EPS, backend="triton", chunk_rows=chunk)

            fused = with_gemm_path(gemms, fused)

            try:
                fused()  # compiles this tile setting outside the measurement
            except Exception as exc:  # noqa: BLE001 - a failing setting is recorded, the sweep goes on
                result.setdefault("errors", []).append({"gemms": gemms, "chunk": chunk_name,
                                                        "error": f"{type(exc).__name__}: {exc}"[:1000]})
                continue
            row = {"gemms": gemms, "chunk": chunk_name, "chunk_rows": chunk, "partials_per_sm": partials,
                   "max_warps": max_warps, "ms": _time_ms(fused, leaves, cuda, reps),
                   "peak_bytes": _peak_bytes(fused, leaves, cuda)}
            for name, base in result["baselines"].items():
                row[f"time/{name}"] = row["ms"] / base["ms"]
                if row["peak_bytes"] is not None and base["peak_bytes"]:
                    row[f"peak/{name}"] = row["peak_bytes"] / base["peak_bytes"]
            result["fused"].append(row)
            print(f"h={h} fused {json.dumps(row)}", flush=True)
    finally:
        _rl._PARTIAL_PROGRAMS_PER_SM, _rl._MAX_WARPS = saved
    best = min(result["fused"], key=lambda row: row["ms"])
    current = next((row for row in result["fused"]
                    if (row["gemms"], row["chunk"], row["partials_per_sm"], row["max_warps"])
                    == ("cublas", "default", *saved)), best)
    result["best"], result["current_defaults"] = best, current
    return result


def device_and_shapes(args) -> tuple[torch.device, torch.dtype, int, list[int]]:
    """CUDA: bf16, ``args.rows`` or 16384 rows, ``args.hidden`` or h 4096 and 8192; CPU (the Triton interpreter
    only): fp32 and a tiny shape."""
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 (tiny shapes) or on a GPU")
    rows = args.rows or (16384 if cuda else 40)
    hiddens = args.hidden or ([4096, 8192] if cuda else [72])
    return torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32, rows, hiddens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="recon_sweep.json")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--partials", type=int, nargs="*", default=[1, 2])
    p.add_argument("--warps", type=int, nargs="*", default=[16])
    p.add_argument("--gemms", nargs="*", default=["cublas", "triton"], help="the Triton backend's matmul paths")
    args = p.parse_args(argv)
    device, dtype, rows, hiddens = device_and_shapes(args)
    cuda = device.type == "cuda"
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (Triton interpreter)", "results": []}
    for h in hiddens:
        out["results"].append(sweep(rows, h, h // 4, dtype, device, compile_baseline=not args.no_compile,
                                    reps=10 if cuda else 1, partials_grid=args.partials, warps_grid=args.warps,
                                    gemms_grid=args.gemms))
        with open(args.out, "w") as f:  # written after each size, so a time-out keeps what finished
            json.dump(out, f, indent=1)
    for res in out["results"]:
        best, cur = res["best"], res["current_defaults"]
        print(f"h={res['hidden']}: current {cur['ms']:.3f} ms, best {best['ms']:.3f} ms "
              f"({best['gemms']} gemms, chunk {best['chunk']}={best['chunk_rows']}, partials/SM {best['partials_per_sm']}, "
              f"max warps {best['max_warps']}); baselines "
              + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in res["baselines"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
