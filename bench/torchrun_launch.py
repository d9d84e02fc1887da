"""Launching a benchmark script on 2 CPU processes (gloo) under torchrun, for the pytest-benchmark wrappers."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, out: str, extra_args_env: str, nproc: int = 2, timeout: int = 3000) -> str:
    """Run ``bench/<script> --out OUT`` (plus the arguments in the environment variable ``extra_args_env``) on
    ``nproc`` processes x 1 thread; its stdout, or an assertion error with its output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", os.path.join(ROOT, "bench", script),
           "--out", out, *shlex.split(os.environ.get(extra_args_env, ""))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout
