"""Training trajectories of the library equal the reference's (the reduced CI version of
``bench/convergence.py``; the full 100-step matrix is ``bench/test_bench_convergence.py``).

A few AdamW steps with gradient accumulation 2 (``num_items_in_batch``) on the benchmark's fixed
synthetic corpus, from the same initial weights and in the same data order as ``ReferenceLoPT``:
- fp32: both families (llama; qwen2 with tied embeddings), k = 2 and 4, every mode, gradient
  checkpointing off and on; every step's task, aux and total loss and the final weights within
  ``FP32_RTOL`` of the reference (2e-5 task and total, 1e-4 aux; weights 1e-3);
- bf16 under autocast: llama k = 2 and qwen2 k = 4, every mode, checkpointing off and on; within the
  benchmark's bf16 bound (twice the reference's own bf16-vs-fp32 spread, at least one bf16 unit
  roundoff) of both the bf16 and the fp32 reference;
- no NaN or inf anywhere;
- and the comparison itself is not blind: a run whose lambda_aux differs by 5% fails the fp32 bound, one
  whose bottom half does not learn (lambda_aux = 0) fails the bf16 bound.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_BENCH = str(Path(__file__).resolve().parents[1] / "bench")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import convergence as cv  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.explicit_modes]

SETTINGS = cv.Settings(steps=10)

FP32 = cv.full_matrix(families=("llama", "qwen2"), precisions=("fp32",), ks=(2, 4))
BF16 = [c for c in cv.full_matrix(families=("llama", "qwen2"), precisions=("bf16-autocast",), ks=(2, 4))
        if (c.family, c.k) in {("llama", 2), ("qwen2", 4)}]
CONFIGS = FP32 + BF16


@pytest.fixture(scope="module")
def matrix():
    runs, references, rows = cv.run_matrix(CONFIGS, SETTINGS)
    return {"runs": runs, "references": references, "rows": {r["config"]: r for r in rows}}


def _describe(row):
    lines = [f"{row['config']}: finite={row['finite']}"]
    for key, tol_key in (("deviation", "tolerance"), ("deviation_vs_fp32_reference", "tolerance_vs_fp32_reference")):
        if key in row:
            lines += [f"  {key} {q}: {row[key][q]['max']:.3e} at step {row[key][q]['step']} "
                      f"(tolerance {row[tol_key][q]:.3e})" for q in cv.QUANTITIES]
    if "weight_deviation" in row:
        lines.append(f"  final weights: {row['weight_deviation']:.3e} (tolerance {cv.FP32_WEIGHT_RTOL:.1e})")
    return "\n".join(lines)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_trajectory_matches_reference(matrix, config):
    row = matrix["rows"][config.name]
    assert row["finite"], _describe(row)
    assert row["ok"], _describe(row)


def test_losses_move(matrix):
    """The runs train (a run that does not learn would match a reference that does not either): the task
    loss of the last three steps is below that of the first three, and the aux loss moves."""
    for ref in matrix["references"].values():
        task, aux = ref["curves"]["task"], ref["curves"]["aux"]
        assert sum(task[-3:]) < sum(task[:3]) - 0.03, (ref["config"].name, task)
        assert max(aux) - min(aux) > 1e-3 * max(aux), (ref["config"].name, aux)


def test_a_deviating_run_is_caught(matrix):
    """lambda_aux 10.5 instead of 10 (a 5% error in the local loss's weight) fails the fp32 comparison."""
    config = cv.Config("llama", "fp32", 2, "activation_free", False)
    windows = cv.corpus(SETTINGS)
    with cv.one_thread():
        run = cv.run_library(config, SETTINGS, windows, lambda_aux=10.5)
    row = cv.evaluate([run], matrix["references"])[0]
    assert row["finite"]
    assert not row["ok"], _describe(row)
    assert row["deviation"]["total"]["max"] > cv.FP32_RTOL["total"], _describe(row)  # from step 1 on
    assert row["weight_deviation"] > cv.FP32_WEIGHT_RTOL, _describe(row)


def test_a_bottom_half_that_does_not_learn_is_caught_in_bf16(matrix):
    """lambda_aux = 0 (no local loss: the bottom blocks never change) fails the bf16 comparison."""
    config = cv.Config("llama", "bf16-autocast", 2, "eager", False)
    with cv.one_thread():
        run = cv.run_library(config, SETTINGS, cv.corpus(SETTINGS), lambda_aux=0.0)
    row = cv.evaluate([run], matrix["references"])[0]
    assert row["finite"]
    assert not row["ok"], _describe(row)
