"""Benchmark: one LoPT training step against end-to-end training and the reference code.

Run with ``pytest bench/test_bench_step.py --benchmark-only``. Each variant of
``lopt-kernels compare`` (see ``lopt_kernels/compare.py``) is a pytest-benchmark case in one group,
so the step times print side by side; its step-peak memory, gradient and parameter bytes and
FLOPs go into ``benchmark.extra_info``, and the memory/FLOP target ratios print at the end.

Shapes: on CUDA the ``cpu-1b`` preset (h=1024, 16 layers, vocab 32000) at batch 2 x seq 4096,
bf16; on CPU the ``tiny`` preset at batch 2 x seq 512, fp32. Both with LoRA r=16 adapters on a
frozen base (the regime where activations dominate). Override with LOPT_BENCH_CONFIG,
LOPT_BENCH_BATCH, LOPT_BENCH_SEQ, LOPT_BENCH_LORA (0: full fine-tune), LOPT_BENCH_STEP_ROUNDS. ``lopt`` and
``lopt+ckpt`` are mode="eager" (their held gradient bytes print too), ``lopt-af*`` mode="activation_free".
"""

from __future__ import annotations

import os

import pytest
import torch

from lopt_kernels.block_hooks import held_gradient_bytes
from lopt_kernels.compare import VARIANTS, build_model, load_config, make_step, synthetic_batch, target_lines
from lopt_kernels.measure import measure_step
from lopt_kernels.patching import _require_state

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CONFIG = os.environ.get("LOPT_BENCH_CONFIG", "cpu-1b" if CUDA else "tiny")
BATCH = int(os.environ.get("LOPT_BENCH_BATCH", 2))
SEQ = int(os.environ.get("LOPT_BENCH_SEQ", 4096 if CUDA else 512))
LORA = int(os.environ.get("LOPT_BENCH_LORA", 16))
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = int(os.environ.get("LOPT_BENCH_STEP_ROUNDS", 5 if CUDA else 2))

_ROWS: dict[str, dict] = {}


class _TargetsPlugin:
    def pytest_terminal_summary(self, terminalreporter):
        if not _ROWS:
            return
        terminalreporter.write_sep("-", f"training step: {CONFIG} batch {BATCH} x seq {SEQ}, LoRA r={LORA}, "
                                        f"{DEVICE.type} {str(DTYPE).removeprefix('torch.')}")
        for row in _ROWS.values():
            terminalreporter.write_line(
                f"{row['variant']:13s} step peak {row['step_peak_bytes'] / 2**20:10.1f} MiB   "
                f"TFLOPs {row['flops'] / 1e12:8.3f}   median step {row['step_s'] * 1e3:9.1f} ms"
                + (f"   held {row['held_bytes'] / 2**20:.1f} MiB" if "held_bytes" in row else "")
            )
        for line in target_lines(list(_ROWS.values())):
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _register_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("lopt-step-bench-summary"):
        manager.register(_TargetsPlugin(), "lopt-step-bench-summary")
    yield


@pytest.mark.benchmark(group="training_step")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step(benchmark, variant):
    config = load_config(CONFIG)
    spec = VARIANTS[variant]
    model = build_model(config, spec, dtype=DTYPE, device=DEVICE, lora=LORA, seed=0)
    batch = synthetic_batch(config, BATCH, SEQ, 0, DEVICE)
    step = make_step(model, spec, batch)

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    run()  # warm-up: gradients allocated, kernels compiled
    model.zero_grad(set_to_none=False)
    mem, flops = measure_step(step, model, DEVICE)
    model.zero_grad(set_to_none=False)
    benchmark.pedantic(run, setup=lambda: model.zero_grad(set_to_none=False), rounds=ROUNDS, warmup_rounds=0)
    median = benchmark.stats.stats.median if getattr(benchmark, "stats", None) else float("nan")
    row = {"variant": variant, "step_peak_bytes": mem.step_peak, "grads_bytes": mem.grads,
           "params_bytes": mem.params, "flops": flops, "step_s": median}
    if spec.lopt_mode == "eager":  # gradients held from the bottom blocks' forward to the backward
        row["held_bytes"] = held_gradient_bytes(_require_state(model))
    _ROWS[variant] = row
    benchmark.extra_info.update(
        config=CONFIG, batch=BATCH, seq=SEQ, lora=LORA, device=DEVICE.type, dtype=str(DTYPE),
        step_peak_mib=round(mem.step_peak / 2**20, 2), grads_mib=round(mem.grads / 2**20, 2),
        params_mib=round(mem.params / 2**20, 2), tflops=round(flops / 1e12, 4),
        held_mib=round(row.get("held_bytes", 0) / 2**20, 2),
    )
