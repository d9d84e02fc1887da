"""Benchmark: the LoPT pipeline (lopt_kernels.pipeline) against single-process LoPT and a 2-stage Schedule1F1B
of end-to-end training, on 2 processes x 1 thread (gloo, CPU). Run with
``pytest bench/test_bench_pipeline.py --benchmark-only -s``; it launches ``bench/pipeline_throughput.py``
under torchrun (override its sizes with LOPT_PIPELINE_BENCH_ARGS, e.g. "--hidden 512 --layers 8"), prints its
table, writes ``bench_results/pipeline/pipeline.json`` and ``pipeline_timeline.png``, and checks the targets
(tokens/s from interleaved rounds and peak-memory ratios, no message upstream)."""

from __future__ import annotations

import json
import os

from torchrun_launch import ROOT, run_script


def test_pipeline_throughput(benchmark):
    out = os.environ.get("LOPT_PIPELINE_BENCH_OUT", os.path.join(ROOT, "bench_results", "pipeline"))

    def launch():
        stdout = run_script("pipeline_throughput.py", out, "LOPT_PIPELINE_BENCH_ARGS")
        print(stdout[stdout.find("LoPT pipeline benchmark"):])

    benchmark.pedantic(launch, rounds=1, iterations=1)
    with open(os.path.join(out, "pipeline.json")) as f:
        result = json.load(f)
    benchmark.extra_info.update({row["variant"]: round(row["tokens_per_s"], 1) for row in result["rows"]})
    assert result["upstream_sends"] == 0
    missed = {name: check for name, check in result["checks"].items() if not check["ok"]}
    assert not missed, f"targets missed: {missed}"
