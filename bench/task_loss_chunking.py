"""The fused task loss alone on CPU: torch's chunked linear cross-entropy by reduction and row chunking.

    python bench/task_loss_chunking.py --rows 255 --hidden 256 --vocab 8016 --dtype bf16     # compare's default shape

What ``lopt-kernels compare``'s step-time gap at its default shape is made of (docs/benchmarks.md): the library asks
torch for per-row losses in bf16 (``reduction="none"``, summed in fp32, so the loss is the model's to fp32
rounding) where a user's end-to-end step asks for the ``mean`` (a bf16-rounded loss); explicit row chunks are faster
but hold more memory. For each variant: forward + backward milliseconds (median of interleaved rounds, one step of
each variant per round) and the step's peak allocated bytes (``lopt_kernels.measure``'s dispatcher count, exact),
the relative error of the loss against fp32 logits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lopt_kernels.measure import _StepAllocations  # noqa: E402


def variants(x, w, t, reduction: str, chunks) -> dict:
    """name -> a zero-argument loss: the user's ``mean`` and the library's ``reduction`` with torch's automatic
    chunking, then the library's with each explicit row chunk."""
    def loss_fn(reduction, options):
        def run():
            loss = F.linear_cross_entropy(x, w, t, reduction=reduction, options=options)
            return loss.float().sum() if reduction == "none" else loss.float() * (t.numel() if reduction == "mean" else 1)
        return run

    out = {"mean auto (the user's)": loss_fn("mean", torch.nn.LinearCrossEntropyOptions()),
           f"{reduction} auto (the library's)": loss_fn(reduction, torch.nn.LinearCrossEntropyOptions())}
    for c in chunks:
        out[f"{reduction} chunks of {c}"] = loss_fn(reduction, torch.nn.LinearCrossEntropyOptions(batch_chunk_size=c))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=255)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8016)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--chunks", type=int, nargs="*", default=[16, 64, 256])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (args.rows,), generator=g)
    exact = float(F.cross_entropy(x.detach().float() @ w.detach().float().T, t, reduction="sum"))
    steps = variants(x, w, t, "none" if dtype == torch.bfloat16 else "sum", args.chunks)
    peaks, errors, times = {}, {}, {name: [] for name in steps}
    for name, step in steps.items():
        x.grad = w.grad = None
        tracker = _StepAllocations()
        with tracker:
            loss = step()
            loss.backward()
        peaks[name], errors[name] = tracker.peak, abs(float(loss.detach()) - exact) / abs(exact)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, step in steps.items():
            x.grad = w.grad = None
            started = time.perf_counter()
            step().backward()
            if round_:
                times[name].append(time.perf_counter() - started)
    print(f"{args.rows} rows x h {args.hidden} x vocab {args.vocab}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    for name in steps:
        print(f"  {name:<28} {statistics.median(times[name]) * 1e3:9.1f} ms  peak {peaks[name] / 2**20:7.2f} MiB  "
              f"loss rel. error {errors[name]:.1e}")


if __name__ == "__main__":
    main()
