"""Step-time ratios of LoPT variants against end-to-end, measured side by side.

``compare`` and ``test_bench_step.py`` time each variant's steps one variant after the other, which a
shared machine's changing load skews. This script builds every variant first, then times one step of
each per round (alternating the order), and reports medians and the step-time targets' ratios.

    python bench/interleaved_step_time.py --config cpu-1b --seq 512 --lora 16 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from lopt_kernels.compare import TARGETS, VARIANTS, build_model, load_config, make_step, synthetic_batch
from lopt_kernels.measure import timed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-1b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="e2e+fce,lopt,e2e+ckpt+fce,lopt+ckpt")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_config(args.config)
    names = [n.strip() for n in args.variants.split(",")]
    models, steps = {}, {}
    for name in names:
        model = build_model(config, VARIANTS[name], dtype=dtype, device=device, lora=args.lora, seed=0)
        steps[name] = make_step(model, VARIANTS[name], synthetic_batch(config, args.batch, args.seq, 0, device))
        steps[name]()  # warm-up: gradients allocated
        model.zero_grad(set_to_none=False)
        models[name] = model
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(steps[name], device))
            models[name].zero_grad(set_to_none=False)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.config}, batch {args.batch} x seq {args.seq}, LoRA r={args.lora}, {device.type}, "
          f"{args.rounds} interleaved rounds")
    for name in names:
        print(f"{name:14s} median step {median[name] * 1e3:9.1f} ms   all {[round(t * 1e3) for t in times[name]]}")
    for t in TARGETS:
        if t.metric == "step_s" and t.num in median and t.den in median:
            ratio = median[t.num] / median[t.den]
            print(f"  [{'ok ' if ratio <= t.bound else 'miss'}] step time {t.num} / {t.den} = {ratio:.3f} "
                  f"(target <= {t.bound})")


if __name__ == "__main__":
    main()
