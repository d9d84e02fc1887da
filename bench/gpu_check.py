"""The whole GPU check in one command, one JSON out, within one device call (so a GPU session never improvises).

    python bench/gpu_check.py --out gpu_check.json        # on the GPU machine, from the repository root

The figures that matter first. In order, each stage a process group of its own with its own time limit (killed
whole when it runs out; the limits before the last stage add up to 450 s, under ``--budget``, default 480 s, which
leaves a 600 s device call room to start; the last stage gets what is left):
1. ``versions``: python, torch, triton, transformers, liger-kernel, the CUDA device, and the fused op's matmul
   probes (``mm(out_dtype=)``, in-place ``addmm(out_dtype=)``), printed first;
2. ``recon_h4096`` and ``recon_h8192`` (``bench/recon_check.py``, one process per size, so ``torch.compile`` is
   specialised to it): the fused op's numerics at the benchmark shape (rows 16384, bf16, r = h / 4) against an
   fp32 reference; fused (through its autograd Function), eager, ``torch.compile`` (``dynamic=False``) and the
   op's six matmuls alone, timed as synchronised interleaved steps and with ``do_bench``; peak memory; the
   targets (fused <= 0.8x compile and <= 1.3x the six matmuls, peak <= 0.25x eager); the fused op twice: its
   default matmul path and its epilogue GEMMs (``LOPT_RECON_GEMMS=triton``), with each path's modelled HBM bytes;
3. ``kernel_tests``: ``tests/ops`` natively (Triton on CUDA tensors), the sm_90 compile test deselected (CI runs it);
4. ``recon_profile``: where the fused op's time goes (per-kernel device time, host time and syncs per call, device
   idle time in a step) at h 4096;
5. ``reconstruction_h4096``: the pytest benchmark (``bench/test_bench_reconstruction_loss.py``), next to
   ``recon_check``'s figures for the same shape, which tells whether its timing differs from them;
6. ``compare_cpu_1b``: ``lopt-kernels compare --config cpu-1b`` on the device (its JSON);
7. ``step_bench``: ``bench/test_bench_step.py`` (every ``compare`` variant at cpu-1b, 2 x 4096, bf16, LoRA r=16);
8. ``recon_sweep``: chunk rows, partial-sum programs per SM and widest CTA, at h 4096 (what the defaults should be).
A stage that fails or runs out of time is recorded as such (with what its script had written) and the next one
still runs; no stage starts past the budget, and the JSON is rewritten after every stage. It runs on torch,
Triton and transformers versions other than CI's: a stage whose script needs what a version lacks fails alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_DEADLINE = [float("inf")]


def _run(name, cmd, timeout, env=None, results=None):
    """Run ``cmd`` as a process group of its own for at most ``timeout`` seconds (less if the budget ends first);
    on time-out the whole group is killed (compile workers and all) and what it printed is kept."""
    timeout = min(timeout, _DEADLINE[0] - time.perf_counter())
    if timeout < 10:
        results[name] = {"rc": None, "skipped": "out of budget", "cmd": " ".join(cmd)}
        print(f"[{name}] skipped: out of budget", flush=True)
        return results[name]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        record = {"rc": proc.returncode, "tail": out[-6000:]}
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        record = {"rc": None, "timed_out": True, "tail": (out or "")[-6000:]}
    record.update(cmd=" ".join(cmd), seconds=round(time.perf_counter() - started, 1), limit_s=round(timeout, 1))
    results[name] = record
    print(f"[{name}] rc={record['rc']} in {record['seconds']} s (limit {record['limit_s']} s)", flush=True)
    return record


def _versions():
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers", "liger_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None) or importlib.metadata.version(mod.replace("_", "-"))
        except Exception as exc:  # noqa: BLE001 - recorded
            out[mod] = f"missing ({type(exc).__name__})"
    import torch  # noqa: PLC0415

    out["cuda"] = torch.cuda.is_available()
    if out["cuda"]:
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
        try:  # which fp32-accumulating matmul path the fused op takes on this runtime
            from lopt_kernels.ops.reconstruction_loss import triton_driver as rl  # noqa: PLC0415

            out["probes"] = {"mm_out_dtype": rl._mm_has_out_dtype("cuda"),
                             "addmm_out_dtype_in_place_bf16": rl._addmm_has_out_dtype_in_place("cuda", torch.bfloat16)}
        except Exception as exc:  # noqa: BLE001 - recorded
            out["probes"] = f"failed ({type(exc).__name__}: {exc})"
    return out


def _reconstruction_targets(bench_json: str) -> dict:
    """Issue 11's GPU targets from a pytest-benchmark JSON of test_bench_reconstruction_loss.py."""
    with open(bench_json) as f:
        data = json.load(f)
    by = {}
    for b in data.get("benchmarks", []):
        name = b["name"].split("[")[-1].rstrip("]") if "[" in b["name"] else b["name"]
        by[name] = {"median_s": b["stats"]["median"], **b.get("extra_info", {})}
    fused = next((v for k, v in by.items() if "fused" in k), None)
    eager = next((v for k, v in by.items() if "eager" in k), None)
    compiled = next((v for k, v in by.items() if "compile" in k), None)
    out = {"variants": by}
    if fused and eager:
        out["fused/eager time"] = fused["median_s"] / eager["median_s"]
        if fused.get("peak_bytes") and eager.get("peak_bytes"):
            out["fused/eager peak"] = fused["peak_bytes"] / eager["peak_bytes"]
    if fused and compiled:
        out["fused/compile time"] = fused["median_s"] / compiled["median_s"]
    if fused and fused.get("modelled_hbm_bytes_per_row") and fused.get("rows"):
        # achieved bandwidth, as the modelled bytes over the measured time
        out["fused achieved GB/s (modelled bytes)"] = (
            fused["modelled_hbm_bytes_per_row"] * fused["rows"] / fused["median_s"] / 1e9)
    checks = {"fused/eager time": 0.6, "fused/eager peak": 0.25, "fused/compile time": 1.3}
    out["targets"] = {k: {"value": out.get(k), "target": t, "ok": out.get(k) is not None and out[k] <= t}
                      for k, t in checks.items()}
    return out


# (stage, time limit in seconds), in the order they run: the limits before the sweep add up to 450 s, under the
# default budget; the sweep gets what is left of it
STAGES = (("recon", 100 + 100), ("tests", 70), ("profile", 60), ("bench", 40), ("compare", 40), ("step", 40),
          ("sweep", 600))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: " + ",".join(s for s, _ in STAGES))
    p.add_argument("--budget", type=float, default=480.0, help="seconds after which no stage starts or runs on")
    args = p.parse_args(argv)
    _DEADLINE[0] = time.perf_counter() + args.budget
    skip = set(filter(None, args.skip.split(",")))
    results = {"versions": _versions()}

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    save()
    print(json.dumps(results["versions"]), flush=True)
    native = {"TRITON_INTERPRET": "0"}
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="gpu_check_")

    def script_stage(name, cmd, limit):  # a script writing one JSON, kept also when it timed out part-way
        path = os.path.join(tmp, f"{name}.json")
        _run(name, [py, *cmd, "--out", path], limit, native, results)
        if os.path.isfile(path):
            with open(path) as f:
                results[name]["json"] = json.load(f)
        save()

    limits = dict(STAGES)
    if "recon" not in skip:
        script_stage("recon_h4096", ["bench/recon_check.py", "--hidden", "4096"], 100)
        script_stage("recon_h8192", ["bench/recon_check.py", "--hidden", "8192"], limits["recon"] - 100)
    if "tests" not in skip:
        _run("kernel_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops", "-k", "not sm90"],
             limits["tests"], native, results)
        save()
    if "profile" not in skip:
        script_stage("recon_profile", ["bench/recon_profile.py", "--hidden", "4096", "--no-compile"], limits["profile"])
    if "bench" not in skip:
        path = os.path.join(tmp, "recon_4096.json")
        record = _run("reconstruction_h4096", [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                               "bench/test_bench_reconstruction_loss.py", "--benchmark-only",
                                               f"--benchmark-json={path}"],
                      limits["bench"], {**native, "LOPT_BENCH_ROWS": "16384", "LOPT_BENCH_HIDDEN": "4096"}, results)
        if record["rc"] == 0 and os.path.isfile(path):
            results["reconstruction"] = {4096: _reconstruction_targets(path)}
        save()
    if "compare" not in skip:
        path = os.path.join(tmp, "compare.json")
        record = _run("compare_cpu_1b", [py, "-m", "lopt_kernels.cli", "compare", "--config", "cpu-1b", "--device",
                                         "cuda", "--json", path], limits["compare"], native, results)
        if record["rc"] == 0 and os.path.isfile(path):
            with open(path) as f:
                results["compare_cpu_1b"]["json"] = json.load(f)
        save()
    if "step" not in skip:
        path = os.path.join(tmp, "step.json")
        _run("step_bench", [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "bench/test_bench_step.py",
                            "--benchmark-only", f"--benchmark-json={path}"], limits["step"], native, results)
        if os.path.isfile(path):
            with open(path) as f:
                results["step_bench"]["rows"] = [{"name": b["name"], "median_s": b["stats"]["median"],
                                                  **b.get("extra_info", {})} for b in json.load(f)["benchmarks"]]
        save()
    if "sweep" not in skip:
        script_stage("recon_sweep", ["bench/recon_sweep.py", "--hidden", "4096", "--no-compile"], limits["sweep"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
