import json
import subprocess
import sys

import pytest

from lopt_kernels.cli import main


def test_compare_prints_table_and_verdict(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    code = main(["compare", "--batch", "2", "--seq", "32", "--steps", "1", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "variant" in printed and "act. peak MiB" in printed
    assert "e2e" in printed and "lopt" in printed
    assert "verdict: gradient boundary holds" in printed and "task loss equals e2e" in printed
    rows = json.loads(out_json.read_text())
    assert [r["variant"] for r in rows] == ["e2e", "lopt"]
    assert rows[1]["bottom_task_grad_max"] == 0.0
    assert rows[1]["activation_peak_bytes"] < rows[0]["activation_peak_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--config", "no-such-preset"], "neither a preset"),
        (["compare", "--batch", "0"], "--batch must be >= 1"),
    ],
)
def test_compare_bad_input(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "lopt_kernels.cli", "compare", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--config" in result.stdout
