"""examples/retention.py: a smoke run of the embedded default (tiny sizes, built in a temporary cache) and the
one-line errors, exit code 2, for bad inputs (as `lopt-kernels compare`)."""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "retention.py")

# The script patches with the mode it is given (--mode, default "auto"), not the library default the suite varies.
pytestmark = pytest.mark.explicit_modes


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _script(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_smoke_run_writes_table_fronts_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    methods = ["e2e", "lopt-k2", "lopt-k4", "lora", "lora+lopt-k2"]
    proc = _script("--smoke", "--cache-dir", tmp_path / "cache", "--steps", 3, "--seeds", 2, "--methods", ",".join(methods),
                   "--lrs", "1e-3,3e-3", "--lora-lrs", "1e-3,1e-2", "--batch-size", 8, "--task-rows", 64,
                   "--task-eval-size", 16, "--general-max-tokens", 2000, "--json", out_json, "--plot", out_png)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "retention [20/20]" in proc.stderr  # progress: one line per finished run when stderr is not a terminal
    assert "Pareto fronts, task_loss vs general_loss_rise" in proc.stdout
    assert "Pareto fronts, task_loss vs flips_lost" in proc.stdout
    for method in methods:
        assert sum(line.startswith(method + " ") for line in proc.stdout.splitlines()) >= 2, proc.stdout
    result = json.loads(out_json.read_text())
    assert result["complete"] and result["methods"] == methods and result["task_metric"] == "task_loss"
    assert {"general_loss_rise", "flips_lost", "front", "verdict"} <= set(result["definitions"])
    before = result["before"]
    assert before["general_loss"] > 0 and before["general_positions"] > 0
    assert 0 <= before["general_right"] <= before["general_positions"]
    assert result["pretraining"]["steps"] == 3 and len(result["pretraining"]["pretraining"]["held_out_loss"]) >= 1
    runs = result["runs"]
    assert len(runs) == 20 and {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert r["general_loss_rise"] == pytest.approx(r["general_loss_after"] - before["general_loss"])
        assert r["retention_ratio"] == pytest.approx(math.exp(-r["general_loss_rise"]))
        assert 0 <= r["flips_lost"] <= before["general_right"]
        assert r["general_top1_after"] * before["general_positions"] == pytest.approx(
            before["general_right"] - r["flips_lost"] + r["flips_gained"])
        assert r["task_loss"] > 0 and 0 <= r["exact_match"] <= 1 and r["train_seconds"] > 0
        assert r["peak_memory_mib"] > 0 and len(r["task_loss_curve"]) == 3
        assert r["lr"] in ((1e-3, 1e-2) if r["method"].startswith("lora") else (1e-3, 3e-3))
        if "lopt" in r["method"]:
            assert len(r["aux_loss_curve"]) == 3 and r["aux_loss_curve"][0] > 0
    for seed in (0, 1):  # the same budget: the same batches, so the same tokens, for every method and lr
        assert len({r["train_tokens"] for r in runs if r["seed"] == seed}) == 1
        first = {r["task_loss_curve"][0] for r in runs if r["seed"] == seed and not r["method"].startswith("lora")}
        assert max(first) - min(first) < 1e-4  # step 1 sees the same batch and the same weights
    for forget in ("general_loss_rise", "flips_lost"):
        proto = result["protocols"][forget]
        assert len(proto["points"]) == 10 and all(p["task"]["n"] == 2 for p in proto["points"])
        assert set(proto["fronts"]) == set(methods) and all(proto["fronts"][m] for m in methods)
        assert len(proto["verdicts"]) == 20 and set(proto["verdicts"].values()) <= {"dominates", "dominated", "neither"}
        assert not proto["task_higher_is_better"] and all(p["task"]["mean"] < 0 for p in proto["points"])  # -loss
        assert result["protocols_by_task_metric"]["task_loss"][forget] == proto
        em = result["protocols_by_task_metric"]["exact_match"][forget]
        assert em["task_higher_is_better"] and len(em["points"]) == 10
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"
    # re-summarised from the JSON, on the other task metric, without training
    again = _script("--from-json", out_json, "--task-metric", "exact_match", "--json", tmp_path / "em.json", "--plot",
                    tmp_path / "em.png")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Pareto fronts, exact_match vs flips_lost" in again.stdout and "retention [" not in again.stderr
    em = json.loads((tmp_path / "em.json").read_text())
    assert em["runs"] == runs and em["protocols"] == result["protocols_by_task_metric"]["exact_match"]
    assert (tmp_path / "em.png").stat().st_size > 10_000


def test_help_defines_every_metric():
    proc = _script("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    defined = proc.stdout.split("definitions (per run")[1]
    for metric in ("task_loss", "exact_match", "general_loss_rise", "flips_lost", "flips_gained", "flips_lost_share",
                   "general_top1_after", "general_ppl_after", "retention_ratio", "train_seconds", "peak_memory_mib",
                   "front", "verdict"):
        assert f"\n  {metric} " in defined, metric
    text = " ".join(defined.split())
    assert "predicted right before (top-1: the argmax of the logits is the actual next token) and wrong after (1 -> 0)" in text


# ------------------------------------------------------------------------------------------------ bad inputs




def _example_module(name):
    """``examples/<name>.py`` imported as a module."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def retention():
    return _example_module("retention")


@pytest.fixture
def files(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "one two", "completion": "three"}] * 8)
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "one two three four five six"}] * 4)
    return task, general


def _one_line_error(retention, capsys, argv, expected):
    assert retention.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("retention: error: "), err
    assert expected in err, err


def test_missing_file_exits_2_with_one_line(tmp_path, model_dir, files):
    task, general = files
    proc = _script("--model", model_dir, "--task-data", tmp_path / "nope.jsonl", "--general-data", general,
                   "--json", tmp_path / "r.json", "--plot", "")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"retention: error: --task-data {str(tmp_path / 'nope.jsonl')!r}: no such file"
    assert not (tmp_path / "r.json").exists()


def test_missing_model_and_general_data(retention, capsys, tmp_path, model_dir, files):
    task, general = files
    _one_line_error(retention, capsys, ["--model", tmp_path / "no-model", "--task-data", task, "--general-data", general],
                    "no-model': no such directory")
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", task, "--general-data", tmp_path / "g.parquet"],
                    "g.parquet': no such file")
    _one_line_error(retention, capsys, ["--model", tmp_path, "--task-data", task, "--general-data", general],
                    "is not a Hugging Face model directory (no config.json)")


def test_model_that_is_not_a_causal_lm(retention, capsys, tmp_path, files):
    from transformers import T5Config

    task, general = files
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32).save_pretrained(tmp_path / "t5")
    _one_line_error(retention, capsys, ["--model", tmp_path / "t5", "--task-data", task, "--general-data", general],
                    "is not a causal LM")


def test_empty_datasets(retention, capsys, tmp_path, model_dir, files):
    task, general = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", empty, "--general-data", general],
                    f"--task-data {str(empty)!r} is empty")
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", task, "--general-data", empty],
                    f"--general-data {str(empty)!r} is empty")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", task, "--general-data", blank],
                    "is empty (no text)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one", "completion": "two"}\nnot json\n')
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", bad, "--general-data", general],
                    "line 2 is not JSON")
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", general, "--general-data", task],
                    "row 1 has no 'text'")
    _one_line_error(retention, capsys, ["--model", model_dir, "--task-data", task, "--general-data", general,
                                        "--methods", "e2e,lopt-k9", "--plot", ""], "cannot be patched for LoPT (k=9)")


def test_bad_methods_and_lrs(retention, capsys, model_dir, files):
    task, general = files
    common = ["--model", model_dir, "--task-data", task, "--general-data", general]
    _one_line_error(retention, capsys, common + ["--methods", "e2e,sgd"], "unknown method 'sgd'")
    _one_line_error(retention, capsys, common + ["--methods", "lopt-k1"], "unknown method 'lopt-k1'")
    _one_line_error(retention, capsys, common + ["--lrs", "1e-3,fast"], "--lrs '1e-3,fast': comma-separated numbers")
    _one_line_error(retention, capsys, common + ["--lora-lrs", "0"], "each must be a positive number")


# ------------------------------------------------------------------------------------------------ the protocol on a toy


@pytest.fixture(scope="module")
def protocol():
    return _example_module("retention_protocol")


def test_count_flips(protocol):
    before = [1, 1, 1, 0, 0, 1, 0]
    after = [1, 0, 0, 1, 0, 1, 0]
    f = protocol.count_flips([bool(b) for b in before], [bool(a) for a in after])
    assert f == {"lost": 2, "gained": 1, "right_before": 4, "right_after": 3, "n": 7, "lost_share": 0.5}
    assert f["right_before"] - f["lost"] + f["gained"] == f["right_after"]
    assert protocol.count_flips([False] * 3, [True] * 3)["lost_share"] == 0.0
    with pytest.raises(ValueError, match="3 examples before, 2 after"):
        protocol.count_flips([True] * 3, [True] * 2)


def _pt(task, forget, std=0.0, n=3, lr=1.0, method="m"):
    return {"method": method, "lr": lr, "task": {"mean": task, "std": std, "n": n},
            "forget": {"mean": forget, "std": std, "n": n}}


def test_pareto_front_and_point_dominance(protocol):
    pts = [_pt(0.9, 0.5, lr=1), _pt(0.5, 0.1, lr=2), _pt(0.4, 0.3, lr=3), _pt(0.9, 0.6, lr=4), _pt(0.7, 0.2, lr=5)]
    front = protocol.pareto_front(pts)
    assert [p["lr"] for p in front] == [2, 5, 1]  # 3 is beaten by 2 and 5, 4 by 1 (same task, more forgetting)
    assert protocol.point_dominates(pts[0], pts[3]) and not protocol.point_dominates(pts[3], pts[0])
    assert not protocol.point_dominates(pts[0], pts[0])  # nothing dominates itself
    # with seed noise, a difference within the margin is no win
    assert protocol.point_dominates(_pt(0.52, 0.1, std=0.05), _pt(0.5, 0.1, std=0.05), z=0)
    assert not protocol.point_dominates(_pt(0.52, 0.1, std=0.05), _pt(0.5, 0.1, std=0.05), z=2)
    assert protocol.point_dominates(_pt(0.7, 0.1, std=0.05), _pt(0.5, 0.1, std=0.05), z=2)


def test_front_dominance(protocol):
    a = [_pt(0.5, 0.1, std=0.01), _pt(0.9, 0.3, std=0.01)]
    better = [_pt(0.6, 0.05, std=0.01), _pt(0.95, 0.2, std=0.01)]
    crossing = [_pt(0.3, 0.01, std=0.01), _pt(0.99, 0.5, std=0.01)]
    assert protocol.front_dominates(better, a) and not protocol.front_dominates(a, better)
    assert not protocol.front_dominates(a, crossing) and not protocol.front_dominates(crossing, a)
    assert not protocol.front_dominates(a, a)  # a front does not dominate itself
    assert not protocol.front_dominates(a, [])
    # a front that reaches only part of the other's range does not dominate it
    assert not protocol.front_dominates([_pt(0.6, 0.05, std=0.01)], a)
    v = protocol.verdicts({"a": a, "better": better, "crossing": crossing})
    assert v["better vs a"] == "dominates" and v["a vs better"] == "dominated"
    assert v["a vs crossing"] == v["crossing vs a"] == "neither"
    # one seed: no standard error, so no margin; before, a zero margin turned any difference into a verdict
    one_seed = [_pt(0.6, 0.05, std=0.0, n=1), _pt(0.95, 0.2, std=0.0, n=1)]
    v = protocol.verdicts({"a": a, "one_seed": one_seed})
    assert v["one_seed vs a"] == v["a vs one_seed"] == protocol.NO_VERDICT


def _toy_run(forget_scale, noise_seed_offset=0):
    """A toy post-training run: learning rate buys task accuracy and costs forgetting; seed noise on both."""
    import random

    def run_one(method, lr, seed):
        rng = random.Random(hash((round(lr * 1e6), seed + noise_seed_offset)))
        task = 1 - math.exp(-lr * 1e3) + rng.gauss(0, 0.02)
        return {"task_score": task, "forget": forget_scale[method] * lr * 1e3 + rng.gauss(0, 0.05),
                "flips": int(100 * forget_scale[method] * lr * 1e3)}
    return run_one


def test_sweep_driver_grid_order_and_callback(protocol):
    calls, done = [], []

    def run_one(method, lr, seed):
        calls.append((method, lr, seed))
        return {"x": 1.0}

    runs = protocol.sweep(["e2e", "lora"], {"e2e": [1e-4, 1e-3], "lora": [1e-3]}, range(2), run_one,
                          lambda r, i, n: done.append((i, n)))
    assert calls == [("e2e", 1e-4, 0), ("e2e", 1e-3, 0), ("lora", 1e-3, 0),
                     ("e2e", 1e-4, 1), ("e2e", 1e-3, 1), ("lora", 1e-3, 1)]  # seed-major
    assert done == [(i, 6) for i in range(1, 7)]
    assert [(r["method"], r["lr"], r["seed"], r["x"]) for r in runs] == [c + (1.0,) for c in calls]
    assert len(protocol.sweep(["a"], [1, 2, 3], [0], lambda m, lr, s: {})) == 3  # one lr list for every method


LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def test_protocol_finds_the_method_that_forgets_less(protocol):
    run_one = _toy_run({"e2e": 1.0, "gentle": 0.3})
    runs = protocol.sweep(["e2e", "gentle"], LRS, range(3), run_one)
    out = protocol.protocol(runs, "task_score", "forget", higher_is_better=True, z=2.0)
    assert out["verdicts"]["gentle vs e2e"] == "dominates" and out["verdicts"]["e2e vs gentle"] == "dominated"
    assert all(p["task"]["n"] == 3 and p["task"]["std"] > 0 for p in out["points"])
    # a loss-like task metric (lower is better) is negated into the same orientation
    for r in runs:
        r["task_loss"] = 1 - r["task_score"]
    neg = protocol.protocol(runs, "task_loss", "forget", higher_is_better=False, z=2.0)
    assert neg["verdicts"] == out["verdicts"]


def test_negative_control_a_copy_of_e2e_does_not_dominate(protocol):
    # the same method under another name: the same runs, so nothing to choose between them
    run_one = _toy_run({"e2e": 1.0, "e2e-copy": 1.0})
    runs = protocol.sweep(["e2e", "e2e-copy"], LRS, range(3), run_one)
    out = protocol.protocol(runs, "task_score", "forget", higher_is_better=True, z=2.0)
    assert out["verdicts"] == {"e2e vs e2e-copy": "neither", "e2e-copy vs e2e": "neither"}
    # the same method with its own seed noise (other seeds): differences are noise, and the margin says so
    for offset in range(1, 21):
        twin = _toy_run({"e2e": 1.0}, noise_seed_offset=100 * offset)
        runs_twin = protocol.sweep(["e2e"], LRS, range(3), twin)
        for r in runs_twin:
            r["method"] = "e2e-twin"
        out = protocol.protocol(runs + runs_twin, "task_score", "forget", higher_is_better=True, z=2.0)
        assert out["verdicts"]["e2e-twin vs e2e"] != "dominates", offset
        assert out["verdicts"]["e2e vs e2e-twin"] != "dominates", offset


def test_aggregate_extra_keys_and_missing_task_values(protocol):
    runs = [{"method": "m", "lr": 1e-3, "seed": s, "t": None if s == 2 else 0.5 + s, "f": 0.1 * s, "x": s}
            for s in range(3)]
    (p,) = protocol.aggregate(runs, "t", "f", True, extra=["x"])
    assert p["seeds"] == [0, 1, 2] and p["task"]["n"] == 2 and p["task"]["mean"] == pytest.approx(1.0)
    assert p["forget"]["mean"] == pytest.approx(0.1) and p["x"] == {"mean": 1.0, "std": 1.0, "n": 3}


def test_presets_fill_what_the_flags_leave_unset(retention):
    """The default run is the quick preset (two methods, two seeds, 60 steps: minutes on a CPU); --preset protocol
    is the documented measurement; a flag given explicitly wins over either."""
    parser = retention.build_parser()
    quick = parser.parse_args([])
    assert retention._check(quick) == ["e2e", "lopt-k2"] and (quick.seeds, quick.steps) == (2, 60)
    protocol = parser.parse_args(["--preset", "protocol"])
    assert retention._check(protocol) == retention.DEFAULT_METHODS.split(",")
    assert (protocol.seeds, protocol.steps, protocol.lrs) == (3, 150, "1e-4,3e-4,1e-3,3e-3")
    explicit = parser.parse_args(["--preset", "protocol", "--seeds", "1", "--methods", "lora"])
    assert retention._check(explicit) == ["lora"] and (explicit.seeds, explicit.steps) == (1, 150)
