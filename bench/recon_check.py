"""The fused reconstruction loss at one benchmark shape: the figures that decide its issue, first and fast.

    python bench/recon_check.py --hidden 4096 --out recon_4096.json     # CUDA: rows 16384, bf16, r = h / 4

One process per hidden size (``bench/gpu_check.py`` runs h 4096 and h 8192 as two stages), so that
``torch.compile`` specialises to this shape alone (``dynamic=False``, after ``torch._dynamo.reset()``). In order,
the JSON rewritten after each, so that a run cut short keeps what finished:

0. ``modelled_traffic``: HBM bytes per row of each matmul path (``TRAFFIC_PASSES``);
1. ``numerics`` (and ``numerics_triton_gemms``): the fused op (Triton, the benchmark dtype) against an fp32
   reference of the same inputs, loss and every gradient, with the tolerances the CPU kernel tests use per dtype;
2. ``timing``: forward + backward of ``fused`` (through its autograd Function, as training calls it; also
   ``fused_triton_gemms``, the same op on its epilogue-GEMM path, ``LOPT_RECON_GEMMS=triton``),
   ``eager`` and ``compiled`` (the naive module, autograd), and ``gemms``: the op's six matmuls alone at full
   size (the compute floor on this card), each timed two ways: ``step_ms`` (synchronised steps, the variants
   interleaved round by round) and ``do_bench_ms`` (``triton.testing.do_bench``);
3. ``peak_bytes``: each variant's peak memory above its inputs;
4. ``targets`` (for each fused variant): fused <= 0.8x compiled and <= 1.3x the six GEMMs (both timings), fused peak <= 0.25x eager's,
   numerics within tolerance.
On CPU (a check that the script runs) it uses a tiny shape, fp32 and the Triton interpreter, CPU times only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import torch  # noqa: E402
import triton  # noqa: E402

from lopt_kernels.ops.reconstruction_loss import reconstruction_loss  # noqa: E402
from lopt_kernels.ops.reconstruction_loss import triton_driver as rl  # noqa: E402
from recon_sweep import _peak_bytes, make_inputs, with_gemm_path  # noqa: E402
from test_bench_reconstruction_loss import EPS, eager_loss  # noqa: E402 - the benchmark's own reference

# The CPU kernel tests' tolerances (tests/ops/test_reconstruction_loss.py): gradients within
# rtol * |want| + max(atol, scaled_atol * max|want|), the loss within loss_rtol * |want| + loss_atol.
TOLERANCES = {
    torch.float32: dict(loss_rtol=1e-4, loss_atol=1e-5, rtol=1e-4, atol=1e-5, scaled_atol=0.0),
    torch.bfloat16: dict(loss_rtol=5e-3, loss_atol=0.0, rtol=2e-2, atol=0.0, scaled_atol=2e-2),
    torch.float16: dict(loss_rtol=5e-3, loss_atol=0.0, rtol=2e-2, atol=0.0, scaled_atol=2e-2),
}
TARGETS = {"fused/compiled time": 0.8, "fused/gemms time": 1.3, "fused/eager peak": 0.25}
GRADIENT_NAMES = ("y", "norm_weight", "norm_bias", "down_weight", "down_bias", "up_weight", "up_bias")


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _probes(device: torch.device, dtype: torch.dtype) -> dict:
    """Which fp32-accumulating matmul path the fused op takes on this runtime."""
    return {"mm_out_dtype": rl._mm_has_out_dtype(device.type),
            "addmm_out_dtype_in_place": rl._addmm_has_out_dtype_in_place(device.type, dtype)}


def numerics(y, x, params, backend: str) -> dict:
    """The fused op's loss and gradients against fp32 autograd of the naive module on the same (rounded) inputs."""
    dtype = y.dtype
    leaves = [y, *params]
    for t in leaves:
        t.grad = None
    loss = reconstruction_loss(y, x, *params, eps=EPS, backend=backend)
    loss.backward()
    got = [t.grad.float() for t in leaves]
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref_loss = eager_loss(ref_leaves[0], x.float(), *ref_leaves[1:])
    ref_loss.backward()
    tol = TOLERANCES[dtype]
    loss, ref_loss = loss.detach(), ref_loss.detach()
    out = {"loss": float(loss), "loss_ref": float(ref_loss),
           "loss_ok": abs(float(loss) - float(ref_loss)) <= tol["loss_rtol"] * abs(float(ref_loss)) + tol["loss_atol"],
           "gradients": {}}
    for name, g, r in zip(GRADIENT_NAMES, got, (t.grad for t in ref_leaves)):
        scale = float(r.abs().max())
        atol = max(tol["atol"], tol["scaled_atol"] * scale)
        excess = float(((g - r).abs() - (atol + tol["rtol"] * r.abs())).max())
        out["gradients"][name] = {"max_abs_err_over_max_ref": float((g - r).abs().max()) / max(scale, 1e-30),
                                  "ok": excess <= 0}
    out["ok"] = out["loss_ok"] and all(v["ok"] for v in out["gradients"].values())
    for t in leaves:
        t.grad = None
    return out


def six_gemms(rows, h, r, dtype, device):
    """A step of the op's six matmuls alone at full size: the down and up projections, the up projection's two
    gradients and the down projection's two (2 rows h r FLOPs each)."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    normed, act, d_recon, d_z = rand(rows, h), rand(rows, r), rand(rows, h), rand(rows, r)
    down, up = rand(r, h), rand(h, r)

    def step():
        normed @ down.t()  # proj
        act @ up.t()  # recon
        d_recon.t() @ act  # d up_weight
        d_recon @ up  # d_act
        d_z.t() @ normed  # d down_weight
        return d_z @ down  # d_normed

    return step


# Modelled HBM traffic per row of one forward + backward, per pass: (what it reads and writes, h-wide rows, r-wide
# rows) in the matmul dtype, each operand row read or written once per pass (ideal caching inside a pass; the
# weights, read once per chunk, left out). Both paths also write and re-read the fp32 row mean and rstd (16 bytes);
# the epilogue-GEMM path writes and re-reads its LayerNorm row terms (2 fp32 per row and column tile of r).
TRAFFIC_PASSES = {
    "cublas": (("LN forward: y -> normed", 2, 0), ("proj = normed @ Wd^T", 1, 1), ("bias + GELU: proj -> act", 0, 2),
               ("recon = act @ Wu^T", 1, 1), ("squared error: recon, x -> d_recon", 3, 0),
               ("dWu += d_recon^T @ act", 1, 1), ("d_act = d_recon @ Wu", 1, 1),
               ("GELU backward: d_act, proj -> d_z", 0, 3), ("dWd += d_z^T @ normed", 1, 1),
               ("d_normed = d_z @ Wd", 1, 1), ("LN backward: d_normed, y -> grad_y", 3, 0)),
    "triton": (("LN forward: y -> normed", 2, 0), ("down GEMM + GELU: normed -> proj, act", 1, 2),
               ("up GEMM + error: act, x -> d_recon", 2, 1), ("dWu += d_recon^T @ act", 1, 1),
               ("d_act GEMM + GELU backward: d_recon, proj -> d_z", 1, 2), ("dWd += d_z^T @ normed", 1, 1),
               ("d_normed GEMM + LN backward: d_z, y -> grad_y", 2, 1)),
}


def modelled_traffic(h: int, r: int, dtype: torch.dtype) -> dict:
    """Bytes per row of each matmul path (``TRAFFIC_PASSES``) and the ratio of the epilogue path to the default."""
    size = torch.empty((), dtype=dtype).element_size()
    term_tiles = triton.cdiv(r, rl._GEMM_CONFIGS["act_grad"][1])
    out = {}
    for path, passes in TRAFFIC_PASSES.items():
        rows_h, rows_r = sum(p[1] for p in passes), sum(p[2] for p in passes)
        extra = 16 + (16 * term_tiles if path == "triton" else 0)
        out[path] = {"bytes_per_row": (rows_h * h + rows_r * r) * size + extra, "h_rows": rows_h, "r_rows": rows_r,
                     "passes": len(passes)}
    out["triton/cublas"] = out["triton"]["bytes_per_row"] / out["cublas"]["bytes_per_row"]
    return out


def variants(y, x, params, backend: str, compile_baseline: bool) -> dict:
    """name -> a zero-argument step doing one forward + backward."""
    def autograd(loss_fn):
        def step():
            loss_fn(y, x, *params).backward()
        return step

    steps = {"fused": autograd(lambda *a: reconstruction_loss(*a, eps=EPS, backend=backend))}
    if backend == "triton":  # the same op with its epilogue GEMMs (LOPT_RECON_GEMMS=triton)
        steps["fused_triton_gemms"] = with_gemm_path("triton", steps["fused"])
    steps["eager"] = autograd(eager_loss)
    if compile_baseline:
        torch._dynamo.reset()  # nothing compiled for another shape: no automatic dynamic shapes
        steps["compiled"] = autograd(torch.compile(eager_loss, dynamic=False))
    return steps


def interleaved_ms(steps: dict, leaves, cuda: bool, rounds: int) -> dict:
    """name -> the milliseconds of each of ``rounds`` synchronised steps, after one warm-up step each (compiles,
    autotunes, warms the device), the variants interleaved round by round so that all meet the same device state."""
    for step in steps.values():
        for t in leaves:
            t.grad = None
        step()
    _sync(cuda)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for t in leaves:
                t.grad = None
            _sync(cuda)
            started = time.perf_counter()
            step()
            _sync(cuda)
            times[name].append((time.perf_counter() - started) * 1e3)
    return times


def timing(steps: dict, leaves, cuda: bool, rounds: int) -> dict:
    times = interleaved_ms(steps, leaves, cuda, rounds)
    out = {}
    for name, step in steps.items():
        out[name] = {"step_ms": statistics.median(times[name]), "step_ms_min_max": [min(times[name]), max(times[name])]}
        if cuda:
            out[name]["do_bench_ms"] = float(triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=leaves))
    return out


def targets(result: dict) -> dict:
    t, peaks = result.get("timing", {}), result.get("peak_bytes", {})
    out = {}
    for fused in ("fused", "fused_triton_gemms"):
        label = "" if fused == "fused" else " [triton gemms]"
        for method in ("step_ms", "do_bench_ms"):
            for base, key in (("compiled", "fused/compiled time"), ("gemms", "fused/gemms time")):
                if method in t.get(fused, {}) and method in t.get(base, {}):
                    value = t[fused][method] / t[base][method]
                    out[f"{key} ({method}){label}"] = {"value": value, "target": TARGETS[key],
                                                       "ok": value <= TARGETS[key]}
        if peaks.get(fused) and peaks.get("eager"):
            value = peaks[fused] / peaks["eager"]
            out[f"fused/eager peak{label}"] = {"value": value, "target": TARGETS["fused/eager peak"],
                                               "ok": value <= TARGETS["fused/eager peak"]}
    for key in ("numerics", "numerics_triton_gemms"):
        if key in result:
            out[f"{key} within tolerance"] = {"value": result[key]["ok"], "ok": result[key]["ok"]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="recon_check.json")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 (tiny shape) or on a GPU")
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    rows, h = args.rows or (16384 if cuda else 40), args.hidden or (4096 if cuda else 72)
    r = max(h // 4, 1)
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "rows": rows, "hidden": h, "rank": r,
              "dtype": str(dtype).removeprefix("torch."), "probes": _probes(device, dtype)}

    def save(stage):
        result["targets"] = targets(result)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"h={h} {stage}: " + json.dumps(result.get(stage), default=str), flush=True)

    result["modelled_traffic"] = modelled_traffic(h, r, dtype)
    save("probes")
    save("modelled_traffic")
    y, x, params = make_inputs(rows, h, r, dtype, device)
    leaves = [y, *params]
    result["numerics"] = numerics(y, x, params, "triton")
    save("numerics")
    try:  # the epilogue-GEMM path is new: its failure must not cost the default path's figures
        result["numerics_triton_gemms"] = with_gemm_path("triton", numerics)(y, x, params, "triton")
    except Exception as exc:  # noqa: BLE001 - recorded, and its timing skipped
        result["numerics_triton_gemms"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    save("numerics_triton_gemms")
    steps = {**variants(y, x, params, "triton", compile_baseline=not args.no_compile),
             "gemms": six_gemms(rows, h, r, dtype, device)}
    if "error" in result["numerics_triton_gemms"]:
        steps.pop("fused_triton_gemms", None)
    result["timing"] = timing(steps, leaves, cuda, args.rounds or (20 if cuda else 1))
    save("timing")
    result["peak_bytes"] = {name: _peak_bytes(step, leaves, cuda) for name, step in steps.items() if name != "gemms"}
    save("peak_bytes")
    print(f"h={h} targets: " + json.dumps(result["targets"]), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
