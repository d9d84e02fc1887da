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
