"""mode='auto' under FSDP2 switching between activation-free and eager from one micro-batch to the next (auto picks
by the batch's size: a short micro-batch's activations are smaller than the held LoRA gradients, a long one's larger),
launched by test_distributed.py on 2 CPU processes over gloo: 3 optimiser steps of 2 accumulated micro-batches (short
then long, gradient sync off on the first); the bottom layers' and the top's parameters (gathered) equal one process
-> OUT/auto_switch_layers_ok; the aux decoders' -> OUT/auto_switch_decoders_ok.

Before the fix, the eager micro-batch's local backward reduced the bottom layers' unsharded gradient that FSDP2 had
accumulated from the activation-free micro-batch (sync off) together with its own, and scaled both by its aux weight
(the bottom layers 4.7e-6 off after 3 steps here; a 4-process BLOOM sweep 2e-4, its unpatched control 3e-8)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import fsdp2_eager_train as base  # noqa: E402
from helpers import exit_distributed_worker  # noqa: E402
from tiny_models import batch  # noqa: E402


def windows(world):
    """Per step a short and a long global micro-batch, every rank's rows alike in padding and prompt (equal label
    counts per rank, as base.windows: the aux term's token share is per micro-batch and process)."""
    for step in range(base.STEPS):
        window = []
        for i, seq in enumerate((4, 30)):
            b = batch(batch_size=2 * world, seq=seq, seed=300 + 2 * step + i, pad_lengths=(0, 2))
            b["labels"][::2, :2] = -100
            window.append(b)
        yield window, sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base.windows = windows  # the short-then-long windows for both runs
    mesh = init_device_mesh("cpu", (world,))
    model = base.sharded("lora", mesh, mode="auto")
    modes = []
    state = model.get_base_model()._lopt_state
    model.register_forward_hook(lambda *_: modes.append(state.current.mode))
    got = base.train_sharded(model, rank, world)
    if rank == 0:
        assert set(modes) == {"activation_free", "eager"}, modes
        want = base.one_process("lora", world)
        for part, names in (("layers", [k for k in want if "lopt_aux_decoders" not in k]),
                            ("decoders", [k for k in want if "lopt_aux_decoders" in k])):
            try:
                base._compare({k: got[k] for k in names}, {k: want[k] for k in names}, 1e-5, 1e-7, f"auto, {part}")
                open(os.path.join(out, f"auto_switch_{part}_ok"), "w").close()
            except AssertionError as exc:  # reported by the test; every rank still leaves cleanly
                print(f"FAILED: {exc}", file=sys.stderr, flush=True)
    exit_distributed_worker()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
