"""examples/retention.py: a smoke run of the embedded default (tiny sizes, built in a temporary cache) and the
one-line errors, exit code 2, for bad inputs (as `lopt-kernels compare`)."""

import json
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
def test_smoke_run_writes_table_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    proc = _script("--smoke", "--cache-dir", tmp_path / "cache", "--steps", 3, "--seeds", 2, "--num-blocks", "2,4",
                   "--batch-size", 8, "--task-rows", 64, "--task-eval-size", 16, "--general-max-tokens", 2000,
                   "--json", out_json, "--plot", out_png)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "retention [6/6]" in proc.stderr  # progress: one line per finished run when stderr is not a terminal
    for method in ("e2e", "lopt-k2", "lopt-k4"):
        assert any(line.startswith(method + " ") for line in proc.stdout.splitlines()), proc.stdout
    result = json.loads(out_json.read_text())
    assert set(result["summary"]) == {"e2e", "lopt-k2", "lopt-k4"}
    assert "retention_ratio" in result["definitions"] and "forgetting_avoided" in result["definitions"]
    before = result["before"]["general_ppl_after"]
    assert before > 1
    runs = result["runs"]
    assert len(runs) == 6 and {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert r["general_ppl_before"] == before
        assert r["retention_ratio"] == pytest.approx(before / r["general_ppl_after"])
        assert r["task_loss"] > 0 and 0 <= r["exact_match"] <= 1 and r["train_seconds"] > 0
        assert r["peak_memory_mib"] > 0 and len(r["task_loss_curve"]) == 3
        if r["method"] != "e2e":
            assert len(r["aux_loss_curve"]) == 3 and r["aux_loss_curve"][0] > 0
            assert r["forgetting_avoided"] is not None
    for seed in (0, 1):  # the same budget: the same batches, so the same tokens, for every method
        assert len({r["train_tokens"] for r in runs if r["seed"] == seed}) == 1
        first = {r["task_loss_curve"][0] for r in runs if r["seed"] == seed}
        assert max(first) - min(first) < 1e-4  # step 1 sees the same batch and the same weights
    for m in ("e2e", "lopt-k2", "lopt-k4"):
        s = result["summary"][m]
        for key in ("task_loss", "exact_match", "general_ppl_after", "retention_ratio", "train_seconds",
                    "peak_memory_mib"):
            assert s[key]["n"] == 2 and s[key]["std"] >= 0
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ bad inputs




@pytest.fixture(scope="module")
def retention():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import retention as module
    finally:
        sys.path.pop(0)
    return module


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
                                        "--num-blocks", "9"], "cannot be patched for LoPT (k=9)")
