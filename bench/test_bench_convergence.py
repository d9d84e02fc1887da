"""Benchmark: the full convergence matrix, library against the reference, 100 AdamW steps.

Run with ``pytest bench/test_bench_convergence.py --benchmark-only`` (about ten minutes on two CPU
cores). It runs ``bench/convergence.py``'s whole matrix (llama, qwen2 tied x fp32, bf16-autocast,
bf16-weights x k 2, 4 x stored, activation_free, eager x checkpointing off, on: 72 library runs, 12
reference runs), writes ``convergence.json`` and ``convergence.png`` into ``LOPT_BENCH_CONVERGENCE_OUT``
(default: a fresh temporary directory, printed at the end of the run), prints the table and asserts the
verdict: every fp32 trajectory within the tight bound, every bf16 one within the stated bf16 bound (see
the module docstring of ``bench/convergence.py``), no NaN or inf. ``LOPT_BENCH_CONVERGENCE_STEPS``
overrides the number of steps (the tolerances are the same; the bf16 yardstick is measured at that length).
The reduced CI version is ``tests/test_convergence.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import convergence as cv  # noqa: E402

STEPS = int(os.environ.get("LOPT_BENCH_CONVERGENCE_STEPS", 100))
_LINES: list[str] = []


class _ReportPlugin:
    @pytest.hookimpl(trylast=True)  # after pytest-benchmark's table
    def pytest_terminal_summary(self, terminalreporter):
        if _LINES:
            terminalreporter.write_sep("-", f"convergence: library vs reference, {STEPS} AdamW steps")
            for line in _LINES:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _register_report(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("lopt-convergence-report"):
        manager.register(_ReportPlugin(), "lopt-convergence-report")
    yield


@pytest.mark.benchmark(group="convergence")
def test_convergence(benchmark):
    out = Path(os.environ.get("LOPT_BENCH_CONVERGENCE_OUT") or tempfile.mkdtemp(prefix="lopt-convergence-"))
    results = {}

    def run():
        results["json"] = cv.run_benchmark(out, cv.Settings(steps=STEPS), verbose=False)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    result = results["json"]
    rows = result["results"]
    _LINES.extend(cv.table_lines(rows) + cv.summary_lines(rows))
    _LINES.append(f"bf16 tolerance: {cv.BF16_JUSTIFICATION}")
    _LINES.append(f"wall time {result['wall_seconds']:.0f} s; wrote {out / 'convergence.json'} and "
                  f"{out / 'convergence.png'}")
    verdict = result["verdict"]
    benchmark.extra_info.update(steps=STEPS, out=str(out), configurations=verdict["configurations"],
                                within_tolerance=verdict["within_tolerance"], finite=verdict["finite"],
                                wall_seconds=result["wall_seconds"])
    failing = [r["config"] for r in rows if not r["ok"]]
    assert verdict["finite"], "NaN or inf in a loss or a final weight"
    assert not failing, f"outside tolerance: {failing}"
    assert verdict["ok"]
