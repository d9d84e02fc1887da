"""bench/gpu_check.py's reading of the reconstruction-loss benchmark JSON and issue 11's GPU targets (the script
itself runs on a GPU machine; here its parsing is checked on a synthetic pytest-benchmark JSON)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.explicit_modes


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench_script(script, out, *args):
    """``bench/<script> --out OUT *args`` on CPU under the Triton interpreter; the finished process."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _bench(name, median, peak, modelled=None):
    return {"name": f"test_reconstruction_loss_fwd_bwd[{name}]", "stats": {"median": median},
            "extra_info": {"peak_bytes": peak, "rows": 16384, "modelled_hbm_bytes_per_row": modelled}}


def test_targets_from_the_benchmark_json(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [_bench("fused", 1.0e-3, 100, 200_000), _bench("eager", 2.0e-3, 500),
                                               _bench("compiled", 0.9e-3, 300)]}))
    out = _gpu_check()._reconstruction_targets(str(path))
    assert out["fused/eager time"] == pytest.approx(0.5) and out["targets"]["fused/eager time"]["ok"]
    assert out["fused/eager peak"] == pytest.approx(0.2) and out["targets"]["fused/eager peak"]["ok"]
    assert out["fused/compile time"] == pytest.approx(1.0 / 0.9) and out["targets"]["fused/compile time"]["ok"]
    assert out["fused achieved GB/s (modelled bytes)"] == pytest.approx(200_000 * 16384 / 1e-3 / 1e9)


def test_a_missed_target_is_reported(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [_bench("fused", 1.5e-3, 200), _bench("eager", 2.0e-3, 500)]}))
    out = _gpu_check()._reconstruction_targets(str(path))
    assert not out["targets"]["fused/eager time"]["ok"] and not out["targets"]["fused/eager peak"]["ok"]
    assert not out["targets"]["fused/compile time"]["ok"]  # not measured counts as not met


def test_recon_sweep_runs_under_the_interpreter(tmp_path):
    """bench/recon_sweep.py end to end on a tiny shape (CPU, Triton interpreter): every setting timed, the JSON
    written, the current defaults found among the rows."""
    out = tmp_path / "sweep.json"
    proc = _run_bench_script("recon_sweep.py", out, "--no-compile", "--rows", "20", "--hidden", "24", "--partials", "1",
                             "2")
    result = json.loads(out.read_text())["results"][0]
    assert {row["chunk"] for row in result["fused"]} == {"8M/h", "default", "grown", "all"}
    # 4 chunk sizes x 2 partials on the default matmul path, 4 chunk sizes on the epilogue GEMMs (no partials)
    assert len(result["fused"]) == 12 and set(result["baselines"]) == {"eager"}
    assert {row["gemms"] for row in result["fused"]} == {"cublas", "triton"}
    current = result["current_defaults"]
    assert (current["gemms"], current["chunk"], current["partials_per_sm"]) == ("cublas", "default", 1)
    assert "h=24: current" in proc.stdout


def test_recon_profile_runs_under_the_interpreter(tmp_path):
    """bench/recon_profile.py end to end on a tiny shape (CPU, Triton interpreter): every variant timed, its host
    time, syncs and per-op table recorded, the JSON written."""
    out = tmp_path / "profile.json"
    _run_bench_script("recon_profile.py", out, "--no-compile", "--rows", "20", "--hidden", "24", "--rounds", "1")
    result = json.loads(out.read_text())["results"][0]
    assert set(result["variants"]) == {"fused", "fused_direct", "eager", "fused_triton_gemms"}
    for record in result["variants"].values():
        assert record["step_ms"] > 0 and record["host_ms"] > 0 and record["syncs"] == 0 and record["kernels"]
    assert any("reconstruction_loss_and_grads" in row["name"] for row in result["variants"]["fused"]["kernels"])


def test_recon_check_runs_under_the_interpreter(tmp_path):
    """bench/recon_check.py (gpu_check's first stages) end to end on a tiny shape (CPU, Triton interpreter): the
    numerics against the fp32 reference within tolerance, every variant and the six matmuls timed, the targets
    written."""
    out = tmp_path / "check.json"
    _run_bench_script("recon_check.py", out, "--no-compile", "--rows", "20", "--hidden", "24", "--rounds", "1")
    result = json.loads(out.read_text())
    assert result["numerics"]["ok"] and set(result["numerics"]["gradients"]) == {
        "y", "norm_weight", "norm_bias", "down_weight", "down_bias", "up_weight", "up_bias"}
    assert result["numerics_triton_gemms"]["ok"]
    assert set(result["timing"]) == {"fused", "fused_triton_gemms", "eager", "gemms"}
    assert "fused/gemms time (step_ms)" in result["targets"] and result["targets"]["numerics within tolerance"]["ok"]
    assert "fused/gemms time (step_ms) [triton gemms]" in result["targets"]
    traffic = result["modelled_traffic"]  # fp32, h 24, r 6: (14 h + 11 r) * 4 + 16 and (10 h + 8 r) * 4 + 16 + 16
    assert traffic["cublas"]["bytes_per_row"] == (14 * 24 + 11 * 6) * 4 + 16
    assert traffic["triton"]["bytes_per_row"] == (10 * 24 + 8 * 6) * 4 + 32


def test_a_stage_that_runs_out_of_time_is_killed_with_its_children(tmp_path):
    """A stage past its limit is killed as a process group (a compile worker it started dies with it) and
    recorded as timed out with what it printed, in about its limit."""
    import sys
    import time

    gpu_check = _gpu_check()
    marker = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(marker)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    results = {}
    started = time.perf_counter()
    record = gpu_check._run("sleepy", [sys.executable, "-c", script], 11, results=results)
    assert time.perf_counter() - started < 30
    assert record["timed_out"] and "started" in record["tail"] and results["sleepy"] is record
    child = int(marker.read_text())
    time.sleep(0.5)
    try:  # gone, or a zombie nobody has reaped yet (a container's init may not reap)
        with open(f"/proc/{child}/stat") as f:
            assert f.read().split(") ")[1].split()[0] == "Z"
    except FileNotFoundError:
        pass
