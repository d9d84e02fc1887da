"""The fused task loss alone on CPU: this library's chunked loop against torch's native chunked op.

    python bench/task_loss_chunking.py --rows 255 --hidden 256 --vocab 8016 --dtype bf16     # compare's default shape
    python bench/task_loss_chunking.py --rows 1023 --hidden 1024 --vocab 32000 --dtype fp32  # cpu-1b, 2 x 512
    python bench/task_loss_chunking.py --rows 1023 --hidden 1024 --vocab 32000 --dtype fp32 --chunks \
        --library-chunks 32 128 512 --materialised --rounds 3     # the loop's rows per chunk (chunk_rows's figures)

Off CUDA the library's task loss is ``ChunkedLinearCrossEntropy`` (``lopt_kernels/ops/linear_cross_entropy.py``): a
loop of PyTorch ops over row chunks that computes the gradients in the forward, logits rounded to the input dtype as
the model's head rounds them. Against it: torch's ``torch.nn.functional.linear_cross_entropy`` as a user's end-to-end
step calls it (``mean``, automatic chunking: ``compare``'s ``e2e+fce``), with the per-row losses (``none``, what
this library ran before: a bf16 ``sum`` or ``mean`` is rounded to bf16), and with explicit row chunks. For each:
forward + backward milliseconds (median of interleaved rounds, one step of each variant per round), the step's peak
allocated bytes (``lopt_kernels.measure``'s dispatcher count, exact) and the loss's relative error against the
model's own loss (the head's logits in the input dtype, upcast to fp32). ``--head-trains`` gives the head weight a
gradient (full fine-tuning); by default it is frozen, as under LoRA.
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


def variants(x, w, t, chunks, library_chunks=(), materialised=False) -> dict:
    """name -> a zero-argument loss (the summed loss, fp32)."""
    from lopt_kernels.ops.linear_cross_entropy import ChunkedLinearCrossEntropy, linear_cross_entropy  # noqa: PLC0415

    def torch_op(reduction, options):
        def run():
            loss = F.linear_cross_entropy(x, w, t, reduction=reduction, options=options)
            return loss.float().sum() if reduction == "none" else loss.float() * (t.numel() if reduction == "mean" else 1)
        return run

    def library_rows(rows):
        return lambda: ChunkedLinearCrossEntropy.apply(x, w, t, None, None, rows)

    out = {"chunked (the library's)": lambda: linear_cross_entropy(x, w, t, impl="chunked") * t.numel(),
           "torch mean auto (the user's)": torch_op("mean", torch.nn.LinearCrossEntropyOptions()),
           "torch none auto": torch_op("none", torch.nn.LinearCrossEntropyOptions())}
    for c in chunks:
        out[f"torch none chunks of {c}"] = torch_op("none", torch.nn.LinearCrossEntropyOptions(batch_chunk_size=c))
    for c in library_chunks:
        out[f"chunked, {c}-row chunks"] = library_rows(c)
    if materialised:
        out["logits whole (the model's)"] = lambda: F.cross_entropy((x @ w.T).float(), t, reduction="sum")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=255)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8016)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--chunks", type=int, nargs="*", default=[64, 256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--library-chunks", type=int, nargs="*", default=[],
                   help="also the library's loop with these explicit rows per chunk")
    p.add_argument("--materialised", action="store_true", help="also the model's own loss: the whole logits, fp32")
    p.add_argument("--head-trains", action="store_true", help="the head weight gets a gradient (full fine-tuning)")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(dtype).requires_grad_(args.head_trains)
    t = torch.randint(0, args.vocab, (args.rows,), generator=g)
    exact = float(F.cross_entropy((x.detach() @ w.detach().T).float(), t, reduction="sum"))  # the model's own
    steps = variants(x, w, t, args.chunks, args.library_chunks, args.materialised)
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
    print(f"{args.rows} rows x h {args.hidden} x vocab {args.vocab}, {args.dtype}, head "
          f"{'trains' if args.head_trains else 'frozen'}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for name in steps:
        print(f"  {name:<28} {statistics.median(times[name]) * 1e3:9.1f} ms  peak {peaks[name] / 2**20:7.2f} MiB  "
              f"loss rel. error {errors[name]:.1e}")


if __name__ == "__main__":
    main()
