import json
import subprocess
import sys

import pytest

from lopt_kernels.cli import main
from lopt_kernels.compare import VARIANTS


pytestmark = pytest.mark.explicit_modes  # compare names every variant's mode itself

SMALL_CONFIG = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
}


def test_compare_prints_table_targets_and_verdict(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    code = main(["compare", "--config", str(config), "--batch", "2", "--seq", "128", "--steps", "1",
                 "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert code == 0
    for column in ("variant", "step peak MiB", "TFLOPs", "step ms", "tokens/s"):
        assert column in printed
    assert "targets (" in printed and "lopt-af+ckpt / seed+ckpt" in printed and "lopt+ckpt / e2e+ckpt+fce" in printed
    assert "verdict: gradient boundary holds" in printed and "task loss equals e2e" in printed
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert list(rows) == list(VARIANTS)
    for name in ("lopt", "lopt+ckpt", "lopt-af", "lopt-af+ckpt"):
        assert rows[name]["bottom_task_grad_max"] == 0.0
    assert rows["lopt-af"]["step_peak_bytes"] < rows["seed"]["step_peak_bytes"]
    assert rows["lopt-af+ckpt"]["step_peak_bytes"] < rows["seed+ckpt"]["step_peak_bytes"]
    assert rows["lopt-af"]["flops"] > rows["e2e+fce"]["flops"]  # the bottom half's recomputation
    # eager: no recomputation (FLOPs are counted, not timed); the held gradients are reported
    assert rows["lopt"]["flops"] <= 1.01 * rows["e2e+fce"]["flops"]
    assert rows["lopt+ckpt"]["flops"] <= 1.01 * rows["e2e+ckpt+fce"]["flops"]
    assert rows["lopt"]["held_bytes"] > 0 and "held_bytes" not in rows["lopt-af"]
    for name in ("seed", "lopt", "lopt-af", "e2e+fce"):
        assert abs(rows[name]["task_loss"] - rows["e2e"]["task_loss"]) < 1e-4


def test_compare_fake_estimates_without_allocating(capsys):
    code = main(["compare", "--fake", "--config", "tiny", "--batch", "1", "--seq", "64", "--lora", "4",
                 "--variants", "e2e+ckpt,lopt-af+ckpt"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "fake tensors (estimate)" in printed and "LoRA r=4" in printed
    assert "FLOPs     lopt-af+ckpt / e2e+ckpt" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--config", "no-such-preset"], "neither a preset"),
        (["compare", "--batch", "0"], "--batch must be >= 1"),
        (["compare", "--fake", "--metrics", "memory,time"], "cannot measure time"),
        (["compare", "--fake", "--steps", "3"], "no meaning with --fake"),
        (["compare", "--variants", "e2e,fast"], "unknown fast"),
        (["compare", "--metrics", "speed"], "unknown speed"),
        (["compare", "--lora", "-1"], "--lora must be >= 0"),
    ],
)
def test_compare_bad_input(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_compare_unreadable_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["compare", "--config", str(bad)]) == 2
    assert "not a valid transformers config.json" in capsys.readouterr().err


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "lopt_kernels.cli", "compare", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--config" in result.stdout and "lopt+ckpt" in result.stdout
