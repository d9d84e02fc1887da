"""``lopt-kernels compare`` itself: its argument parser, the checks of its arguments, progress on stderr, and
``compare_main``, which runs the variants and prints the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from .report import format_table, mib, summary_lines, verdict, write_plot
from .targets import CONDITIONS, measurable_targets, setup_of, target_lines, targets_header
from .variants import (
    DTYPES,
    METRICS,
    PRESETS,
    VARIANTS,
    CompareError,
    load_config,
    no_packed_sequence_detection,
    run_defaults,
    run_variant,
    synthetic_batch,
)


class _Progress:
    """Progress on stderr while the variants run: a tqdm bar on a terminal, else one line per variant
    as it finishes (logs, CI, pipes)."""

    def __init__(self, variants: list[str]):
        self.total = len(variants)
        self.count = 0
        self.bar = None
        self.started = 0.0
        if sys.stderr.isatty():
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=self.total, desc="compare", unit="variant", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def start(self, name: str) -> None:
        self.started = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self, name: str, row: dict) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        seconds = time.perf_counter() - self.started
        peak = "" if row.get("step_peak_bytes") is None else f", step peak {mib(row['step_peak_bytes'])} MiB"
        print(f"compare [{self.count}/{self.total}] {name} done in {seconds:.1f} s{peak}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-kernels", description="LoPT kernels: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    description = sys.modules[__package__].__doc__  # the package's docstring (compare/__init__.py) is the help text
    cmp = sub.add_parser("compare", help="training-step variants side by side: memory, FLOPs, time, losses",
                         description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmp.add_argument("--config", default="tiny", help=f"embedded preset ({', '.join(PRESETS)}) or a config.json path")
    cmp.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    cmp.add_argument("--batch", type=int, default=None, help="default: the config's own (tiny: 1), else 2")
    cmp.add_argument("--seq", type=int, default=None, help="default: the config's own (tiny: 256), else 256")
    cmp.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: the config's own (tiny: bf16), "
                     "else fp32")
    cmp.add_argument("--lora", type=int, default=None, metavar="R", help="LoRA adapters of rank R on every linear "
                     "layer, frozen base (PEFT); 0: full fine-tune (default: the config's own (tiny: 1), else 0)")
    cmp.add_argument("--fake", action="store_true", help="estimate memory and FLOPs under FakeTensorMode, allocating "
                     "nothing (any model size on a laptop); time is not available")
    cmp.add_argument("--metrics", default=None, help="comma-separated from memory, flops, time "
                     "(default: all; memory,flops with --fake)")
    cmp.add_argument("--steps", type=int, default=None, help="timed steps per variant, median reported (default 3)")
    cmp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    cmp.add_argument("--plot", dest="plot_path", metavar="PATH", help="also write a PNG of step peak memory against "
                     "step time (FLOPs under --fake), Pareto front drawn; needs matplotlib: pip install "
                     "'lopt-kernels[plot]'")
    return parser


def _parse(args):
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise CompareError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    metrics = ["memory", "flops"] if args.fake else list(METRICS)
    if args.metrics is not None:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise CompareError(f"--metrics: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METRICS)}")
    if args.fake and "time" in metrics:
        raise CompareError("--fake allocates and computes nothing, so it cannot measure time: drop 'time' from --metrics")
    if args.fake and args.steps is not None:
        raise CompareError("--steps times real steps; it has no meaning with --fake")
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise CompareError("--plot needs matplotlib: pip install 'lopt-kernels[plot]'") from None
    for key, value in run_defaults(args.config).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype not in DTYPES:
        raise CompareError(f"--dtype {args.dtype!r} (from --config {args.config!r}) is not one of {', '.join(DTYPES)}")
    for flag in ("batch", "seq"):
        if getattr(args, flag) < 1:
            raise CompareError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 1:
        raise CompareError(f"--steps must be >= 1, got {args.steps}")
    if args.lora < 0:
        raise CompareError(f"--lora must be >= 0, got {args.lora}")
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.fake else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise CompareError(f"--device {device!r} is not available here (cpu{', cuda' if torch.cuda.is_available() else ''})")
    if args.fake and device != "cpu":
        raise CompareError("--fake runs on fake CPU tensors; drop --device")
    return variants, metrics, torch.device(device)


def compare_main(args) -> int:
    variants, metrics, device = _parse(args)
    config = load_config(args.config)
    text = config.get_text_config()
    dtype = DTYPES[args.dtype]
    steps = args.steps or 3

    def batch_fn():
        return synthetic_batch(config, args.batch, args.seq, args.seed, device)

    mode = "fake tensors (estimate)" if args.fake else device.type
    lora = f", LoRA r={args.lora} (frozen base)" if args.lora else ", full fine-tune"
    run_title = (f"{Path(args.config).name} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
                 f"vocab {text.vocab_size}), batch {args.batch} x seq {args.seq}, {args.dtype}{lora}, {mode}")
    print(f"lopt-kernels compare: {args.config} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
          f"vocab {text.vocab_size}), batch {args.batch} x seq {args.seq}, {args.dtype}{lora}, {mode}", flush=True)
    rows = []
    patch_ctx = no_packed_sequence_detection() if args.fake else contextlib.nullcontext()
    with patch_ctx, _Progress(variants) as progress:
        for name in variants:
            progress.start(name)
            rows.append(run_variant(VARIANTS[name], config, batch_fn, metrics=metrics, steps=steps, device=device,
                                    dtype=dtype, lora=args.lora, seed=args.seed, fake=args.fake))
            progress.done(name, rows[-1])
    setup = setup_of(config, batch=args.batch, seq=args.seq, dtype=dtype, lora=args.lora, rows=rows)
    summary = summary_lines(rows, setup)
    if summary:
        print("\n".join(summary))
    print(format_table(rows))
    checks = target_lines(rows, setup)
    if checks:
        print(targets_header(setup))
        print("\n".join(checks))
    elif measurable_targets(rows):
        print("targets: none applies to this configuration (they are set for "
              + "; ".join(desc for key, (desc, _) in CONDITIONS.items() if key != "any") + ")")
    print(verdict(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    if args.plot_path:
        write_plot(rows, args.plot_path, title=f"lopt-kernels compare: {run_title}")
        print(f"plot: {args.plot_path}")
    broken = any(r.get("bottom_task_grad_max", 0.0) != 0.0 for r in rows)
    return 1 if broken else 0
