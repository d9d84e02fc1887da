"""The whole GPU check in one command, within 10 minutes, one JSON out (so a GPU session never improvises).

    python bench/gpu_check.py --out gpu_check.json        # on the GPU machine, from the repository root

In order, each with its own time limit (the sum stays under 10 minutes):
1. versions: python, torch, triton, transformers, liger-kernel, CUDA device;
2. the kernel tests natively (``tests/ops``, Triton on CUDA tensors, no interpreter);
3. ``bench/test_bench_reconstruction_loss.py`` at rows 16384, bf16, h 4096 and h 8192 (fused Triton vs eager vs
   ``torch.compile``: times, peak memory, the modelled HBM bytes per row), with issue 11's GPU targets checked:
   fused <= 0.6x eager time and <= 0.25x eager peak memory, <= 1.3x torch.compile's time, achieved bandwidth;
4. ``bench/recon_profile.py``: where the fused op's time goes (per-kernel device time, host time per call, host
   syncs, device idle time inside a step) and the op timed both ways (synchronised steps, interleaved with eager and
   torch.compile, and ``do_bench``), through its autograd Function and called directly;
5. ``lopt-kernels compare --config cpu-1b`` on the device (its JSON);
6. ``bench/test_bench_step.py`` (every ``compare`` variant at cpu-1b, 2 x 4096, bf16, LoRA r=16);
7. ``bench/recon_sweep.py``: the fused op's chunk rows, partial-sum programs per SM and widest CTA, timed side by
   side with eager and torch.compile at the same shapes (which settings the defaults should be).
A stage that fails or runs out of time is recorded as such and the next one still runs; no stage starts past
``--budget`` seconds, and the JSON is rewritten after every stage, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_DEADLINE = [float("inf")]


def _run(name, cmd, timeout, env=None, results=None):
    timeout = min(timeout, _DEADLINE[0] - time.perf_counter())
    if timeout < 10:
        results[name] = {"rc": None, "skipped": "out of budget", "cmd": " ".join(cmd)}
        print(f"[{name}] skipped: out of budget", flush=True)
        return results[name]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        record = {"rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-6000:]}
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        record = {"rc": None, "timed_out": True, "tail": out[-6000:]}
    record.update(cmd=" ".join(cmd), seconds=round(time.perf_counter() - started, 1))
    results[name] = record
    print(f"[{name}] rc={record['rc']} in {record['seconds']} s", flush=True)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: tests,recon,profile,compare,step,sweep")
    p.add_argument("--budget", type=float, default=570.0, help="seconds after which no stage starts or runs on")
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
    if "tests" not in skip:
        _run("kernel_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops"], 150, native, results)
        save()
    if "recon" not in skip:
        results["reconstruction"] = {}
        for hidden in (4096, 8192):
            path = os.path.join(tmp, f"recon_{hidden}.json")
            record = _run(f"reconstruction_h{hidden}", [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                                        "bench/test_bench_reconstruction_loss.py", "--benchmark-only",
                                                        f"--benchmark-json={path}"],
                          120, {**native, "LOPT_BENCH_ROWS": "16384", "LOPT_BENCH_HIDDEN": str(hidden)}, results)
            if record["rc"] == 0 and os.path.isfile(path):
                results["reconstruction"][hidden] = _reconstruction_targets(path)
            save()

    def script_stage(name, script):  # a bench script writing one JSON, kept also when it timed out part-way
        path = os.path.join(tmp, f"{name}.json")
        _run(name, [py, script, "--out", path], 150, native, results)
        if os.path.isfile(path):
            with open(path) as f:
                results[name]["json"] = json.load(f)
        save()

    if "profile" not in skip:
        script_stage("recon_profile", "bench/recon_profile.py")
    if "compare" not in skip:
        path = os.path.join(tmp, "compare.json")
        record = _run("compare_cpu_1b", [py, "-m", "lopt_kernels.cli", "compare", "--config", "cpu-1b", "--device",
                                         "cuda", "--json", path], 120, native, results)
        if record["rc"] == 0 and os.path.isfile(path):
            with open(path) as f:
                results["compare_cpu_1b"]["json"] = json.load(f)
        save()
    if "step" not in skip:
        path = os.path.join(tmp, "step.json")
        _run("step_bench", [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "bench/test_bench_step.py",
                            "--benchmark-only", f"--benchmark-json={path}"], 150, native, results)
        if os.path.isfile(path):
            with open(path) as f:
                results["step_bench"]["rows"] = [{"name": b["name"], "median_s": b["stats"]["median"],
                                                  **b.get("extra_info", {})} for b in json.load(f)["benchmarks"]]
        save()
    if "sweep" not in skip:
        script_stage("recon_sweep", "bench/recon_sweep.py")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
