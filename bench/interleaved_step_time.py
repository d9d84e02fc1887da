"""Eager LoPT's step time against the end-to-end steps users actually run, measured side by side.

    python bench/interleaved_step_time.py --config cpu-1b --seq 512 --lora 16 --rounds 9 --threads 1,2
    python bench/interleaved_step_time.py --config tiny --batch 1 --seq 256 --lora 1 --dtype bf16 --rounds 15

(the second is ``lopt-kernels compare``'s default shape: the ``tiny`` preset, 1 x 256, bf16, LoRA r=1).

Every variant is built first; then each round runs one step (forward + backward) of every variant, in an order
that alternates between rounds, so that a shared machine's changing load hits them all alike. Reported: the median
over the rounds and the spread (min-max, and the interquartile range), for each thread setting in a process of its
own (``OMP_NUM_THREADS`` and ``torch.set_num_threads``). Variants, each without and with per-layer checkpointing
(``+ckpt``):

- ``e2e-own``: the unpatched model's own loss (``model(**batch).loss``, logits materialised);
- ``e2e-lce``: what a user writes for a fused end-to-end step: the unpatched backbone, then on CPU torch's native
  chunked ``torch.nn.functional.linear_cross_entropy(h, lm_head.weight, labels,
  options=torch.nn.LinearCrossEntropyOptions())`` (mean over the label tokens), on CUDA Liger's fused linear
  cross-entropy (``LigerFusedLinearCrossEntropyLoss``, as ``use_liger_kernel`` patches it in);
- ``lopt``: ``patch(mode="eager")``, ``model(**batch).loss`` (task loss fused, aux term included).

Target: ``lopt`` / ``e2e-lce`` <= 1.03 with and without checkpointing (<= 1.0 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = 1.03


def _user_lce_step(model, batch):
    """The unpatched backbone and the fused end-to-end loss as a user calls it (``compare``'s ``e2e+fce``)."""
    from lopt_kernels.compare import user_fused_loss  # noqa: PLC0415
    from lopt_kernels.ops.linear_cross_entropy import shift_labels_of  # noqa: PLC0415

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = lm.base_model
    loss_of = user_fused_loss(lm.get_output_embeddings(), shift_labels_of(batch["labels"]))

    def step():
        hidden = backbone(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
        loss_of(hidden).backward()

    return step


def measure(args) -> dict:
    """One thread setting: every variant's step times over interleaved rounds."""
    import torch  # noqa: PLC0415

    from lopt_kernels.compare import Variant, build_model, load_config, synthetic_batch  # noqa: PLC0415
    from lopt_kernels.measure import timed  # noqa: PLC0415

    torch.set_num_threads(args.threads_one)
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = load_config(args.config)
    batch = synthetic_batch(config, args.batch, args.seq, 0, device)
    models, steps = {}, {}
    for ckpt in (False, True):
        suffix = "+ckpt" if ckpt else ""
        for name, mode in (("e2e-own", None), ("e2e-lce", None), ("lopt", "eager")):
            variant = Variant(name + suffix, mode, ckpt, mode is not None)
            model = build_model(config, variant, dtype=dtype, device=device, lora=args.lora, seed=0)
            if name == "e2e-lce":
                step = _user_lce_step(model, batch)
            else:
                def step(model=model):
                    model(**batch, use_cache=False).loss.backward()
            steps[variant.name], models[variant.name] = step, model
    names = list(steps)
    for name in names:  # warm-up: gradients allocated, kernels chosen
        steps[name]()
        models[name].zero_grad(set_to_none=False)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(steps[name], device))
            models[name].zero_grad(set_to_none=False)
    return {"threads": args.threads_one, "device": device.type, "times": times}


def _quartiles(values):
    """The first and third quartiles, interpolated between the measured times (never outside min-max)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def report(args, results) -> dict:
    dtype = args.dtype or ("bf16" if results[0]["device"] == "cuda" else "fp32")
    print(f"{args.config}, batch {args.batch} x seq {args.seq}, {dtype}, LoRA r={args.lora}, "
          f"{args.rounds} interleaved rounds")
    checks = {}
    for res in results:
        print(f"\n{res['device']}, {res['threads']} thread(s)")
        print(f"{'variant':<14}{'median ms':>11}{'IQR ms':>16}{'min-max ms':>18}")
        median = {}
        for name, t in res["times"].items():
            median[name] = statistics.median(t)
            lo, hi = _quartiles(t)
            print(f"{name:<14}{median[name] * 1e3:>11.1f}{f'{lo * 1e3:.0f}-{hi * 1e3:.0f}':>16}"
                  f"{f'{min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}':>18}")
        for suffix in ("", "+ckpt"):
            for base in ("e2e-lce", "e2e-own"):
                ratio = median["lopt" + suffix] / median[base + suffix]
                key = f"{res['threads']} thread(s): lopt{suffix} / {base}{suffix}"
                target = (1.0 if res["device"] == "cuda" else TARGET) if base == "e2e-lce" else None
                checks[key] = {"value": ratio, "target": target, "ok": target is None or ratio <= target}
                mark = "   " if target is None else ("ok " if ratio <= target else "MISS")
                print(f"  [{mark}] {key} = {ratio:.3f}" + ("" if target is None else f" (target <= {target})"))
    return checks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-1b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread settings, each in its own process")
    parser.add_argument("--json", default=None, help="write every round's times and the checks here")
    parser.add_argument("--threads-one", dest="threads_one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads_one is not None:  # a child: one thread setting, its times as JSON on the last line
        print(json.dumps(measure(args)))
        return
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--seq", str(args.seq),
               "--batch", str(args.batch), "--lora", str(args.lora), "--rounds", str(args.rounds),
               "--threads-one", str(threads)] + (["--dtype", args.dtype] if args.dtype else [])
        started = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[{threads} thread(s): {time.perf_counter() - started:.0f} s]", file=sys.stderr)
    checks = report(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "checks": checks}, f, indent=1)


if __name__ == "__main__":
    main()
