"""Benchmark: one LoPT training step against end-to-end training and the reference code.

Run with ``pytest bench/test_bench_step.py --benchmark-only``. Each variant of
``lopt-kernels compare`` (see ``lopt_kernels/compare/``) is a pytest-benchmark case in one group,
so the step times print side by side; its step-peak memory, gradient and parameter bytes and
FLOPs go into ``benchmark.extra_info``, and the memory/FLOP target ratios print at the end.

Shapes: on CUDA the ``cpu-1b`` preset (h=1024, 16 layers, vocab 32000) at batch 2 x seq 4096,
bf16, LoRA r=16; on CPU what ``lopt-kernels compare`` runs by default: the ``tiny`` preset (llama3-8b
at 1/16 width) at batch 1 x seq 256, bf16, LoRA r=1. Both LoRA on a frozen base (the regime where
activations dominate). Override with LOPT_BENCH_CONFIG, LOPT_BENCH_BATCH, LOPT_BENCH_SEQ,
LOPT_BENCH_LORA (0: full fine-tune), LOPT_BENCH_DTYPE (fp32, bf16, fp16), LOPT_BENCH_STEP_ROUNDS.
The run ends with the summary ``lopt-kernels compare`` prints (LoPT against end-to-end at the same
checkpointing, which variant to pick) and the targets that apply; LOPT_BENCH_PLOT=path.png also
writes its plot (``--plot``). ``lopt`` and ``lopt+ckpt`` are mode="eager" (their held gradient bytes
print too), ``lopt-af*`` mode="activation_free".
"""

from __future__ import annotations

import os

import pytest
import torch

from lopt_kernels.block_hooks import held_gradient_bytes
from lopt_kernels.compare import (
    DTYPES,
    VARIANTS,
    build_model,
    load_config,
    make_step,
    run_defaults,
    setup_of,
    summary_lines,
    synthetic_batch,
    target_lines,
    targets_header,
    write_plot,
)
from lopt_kernels.measure import measure_step
from lopt_kernels.patching import require_state

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_DEFAULTS = {"config": "cpu-1b", "batch": 2, "seq": 4096, "dtype": "bf16", "lora": 16} if CUDA else \
    {"config": "tiny", **run_defaults("tiny")}
CONFIG = os.environ.get("LOPT_BENCH_CONFIG", _DEFAULTS["config"])
BATCH = int(os.environ.get("LOPT_BENCH_BATCH", _DEFAULTS["batch"]))
SEQ = int(os.environ.get("LOPT_BENCH_SEQ", _DEFAULTS["seq"]))
LORA = int(os.environ.get("LOPT_BENCH_LORA", _DEFAULTS["lora"]))
DTYPE_NAME = os.environ.get("LOPT_BENCH_DTYPE", _DEFAULTS["dtype"])
DTYPE = DTYPES[DTYPE_NAME]
ROUNDS = int(os.environ.get("LOPT_BENCH_STEP_ROUNDS", 5 if CUDA else 2))
PLOT = os.environ.get("LOPT_BENCH_PLOT")

_ROWS: dict[str, dict] = {}


class _TargetsPlugin:
    @pytest.hookimpl(trylast=True)  # after pytest-benchmark's table: the run ends with the summary
    def pytest_terminal_summary(self, terminalreporter):
        if not _ROWS:
            return
        rows = list(_ROWS.values())
        title = f"{CONFIG} batch {BATCH} x seq {SEQ}, LoRA r={LORA}, {DEVICE.type} {DTYPE_NAME}"
        terminalreporter.write_sep("-", f"training step: {title}")
        for row in rows:
            terminalreporter.write_line(
                f"{row['variant']:13s} step peak {row['step_peak_bytes'] / 2**20:10.1f} MiB   "
                f"TFLOPs {row['flops'] / 1e12:8.3f}   median step {row['step_s'] * 1e3:9.1f} ms"
                + (f"   held {row['held_bytes'] / 2**20:.1f} MiB" if "held_bytes" in row else "")
            )
        setup = setup_of(load_config(CONFIG), batch=BATCH, seq=SEQ, dtype=DTYPE, lora=LORA, rows=rows)
        checks = target_lines(rows, setup)
        if checks:
            terminalreporter.write_line(targets_header(setup))
            for line in checks:
                terminalreporter.write_line(line)
        for line in summary_lines(rows, setup):
            terminalreporter.write_line(line)
        if PLOT:
            write_plot(rows, PLOT, title=f"pytest bench/test_bench_step.py: {title}")
            terminalreporter.write_line(f"plot: {PLOT}")


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
    decoder_ids = {id(p) for p in require_state(model).decoders.parameters()} if spec.lopt_mode else set()
    median = benchmark.stats.stats.median if getattr(benchmark, "stats", None) else float("nan")
    row = {"variant": variant, "step_peak_bytes": mem.step_peak, "grads_bytes": mem.grads,
           "params_bytes": mem.params, "flops": flops, "step_s": median,
           "trainable_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
                                  and (spec.lopt_mode is None or id(p) not in decoder_ids))}
    if spec.lopt_mode == "eager":  # gradients held from the bottom blocks' forward to the backward
        row["held_bytes"] = held_gradient_bytes(require_state(model))
    _ROWS[variant] = row
    benchmark.extra_info.update(
        config=CONFIG, batch=BATCH, seq=SEQ, lora=LORA, device=DEVICE.type, dtype=str(DTYPE),
        step_peak_mib=round(mem.step_peak / 2**20, 2), grads_mib=round(mem.grads / 2**20, 2),
        params_mib=round(mem.params / 2**20, 2), tflops=round(flops / 1e12, 4),
        held_mib=round(row.get("held_bytes", 0) / 2**20, 2),
    )
