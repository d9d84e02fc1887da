"""Benchmark: LoPT's boundary modes under FSDP2 against end-to-end FSDP2 training (full fine-tune and LoRA), on 2
processes x 1 thread (gloo, CPU). Run with ``pytest bench/test_bench_fsdp2.py --benchmark-only -s``; it launches
``bench/fsdp2_modes.py`` under torchrun (override its sizes with LOPT_FSDP2_BENCH_ARGS, e.g. "--hidden 512"),
prints its table (FLOPs, step peak per rank, s/step from interleaved rounds), writes
``bench_results/fsdp2/fsdp2.json`` and checks eager's FLOPs within 1.01x of end-to-end's."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_modes(benchmark):
    out = os.environ.get("LOPT_FSDP2_BENCH_OUT", os.path.join(ROOT, "bench_results", "fsdp2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", os.path.join(ROOT, "bench", "fsdp2_modes.py"),
           "--out", out, *shlex.split(os.environ.get("LOPT_FSDP2_BENCH_ARGS", ""))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}

    def launch():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        print(proc.stdout[proc.stdout.find("LoPT under FSDP2"):])

    benchmark.pedantic(launch, rounds=1, iterations=1)
    with open(os.path.join(out, "fsdp2.json")) as f:
        result = json.load(f)
    benchmark.extra_info.update({f"{r['finetune']}/{r['variant']}": r["seconds"] for r in result["rows"]})
    flops = {name: c for name, c in result["checks"].items() if "FLOPs" in name}
    assert all(c["ok"] for c in flops.values()), flops
