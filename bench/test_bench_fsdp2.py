"""Benchmark: LoPT's boundary modes under FSDP2 against end-to-end FSDP2 training (full fine-tune and LoRA), on 2
processes x 1 thread (gloo, CPU). Run with ``pytest bench/test_bench_fsdp2.py --benchmark-only -s``; it launches
``bench/fsdp2_modes.py`` under torchrun (override its sizes with LOPT_FSDP2_BENCH_ARGS, e.g. "--hidden 512"),
prints its table (FLOPs, step peak per rank, s/step from interleaved rounds), writes
``bench_results/fsdp2/fsdp2.json`` and checks eager's FLOPs within 1.01x of end-to-end's and its step peak at most
activation-free's plus the sharded gradients eager holds."""

from __future__ import annotations

import json
import os

from torchrun_launch import ROOT, run_script


def test_fsdp2_modes(benchmark):
    out = os.environ.get("LOPT_FSDP2_BENCH_OUT", os.path.join(ROOT, "bench_results", "fsdp2"))

    def launch():
        stdout = run_script("fsdp2_modes.py", out, "LOPT_FSDP2_BENCH_ARGS")
        print(stdout[stdout.find("LoPT under FSDP2"):])

    benchmark.pedantic(launch, rounds=1, iterations=1)
    with open(os.path.join(out, "fsdp2.json")) as f:
        result = json.load(f)
    benchmark.extra_info.update({f"{r['finetune']}/{r['variant']}": r["seconds"] for r in result["rows"]})
    checks = {name: c for name, c in result["checks"].items() if "FLOPs" in name or "peak" in name}
    assert all(c["ok"] for c in checks.values()), checks
