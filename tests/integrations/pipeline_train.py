"""A LoPT pipeline (one block per rank) trained for a few optimiser steps, launched by test_pipeline.py as
``torchrun --nproc_per_node K pipeline_train.py MODEL_DIR OUT STEPS GA CKPT``. Each rank writes its shard and a
JSON record (its P2P message counts, rank 0's peak of nothing more); the test joins the shards and compares."""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers import exit_distributed_worker  # noqa: E402
from lopt_kernels.pipeline import PipelineStage, train_pipeline  # noqa: E402
from tiny_models import batch  # noqa: E402

LR = 0.5  # plain SGD: parameters stay linear in the gradients, so equality is at rounding level


def micro_batches():
    """The same micro-batches on every rank (and in the single-process reference)."""
    i = 0
    while True:
        yield batch(batch_size=2, seq=9 + i % 3, seed=100 + i, pad_lengths=(0, 2))
        i += 1


def mixed_dtypes(model_dir, out):
    """Rank 1 started in bf16, the others in fp32: every rank must raise the same clear error before compute."""
    import lopt_kernels  # noqa: PLC0415

    rank = dist.get_rank()
    try:
        PipelineStage.from_pretrained(model_dir, dtype=torch.bfloat16 if rank == 1 else torch.float32)
    except lopt_kernels.LoptPatchError as exc:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(str(exc))
    exit_distributed_worker()


def main(model_dir, out, steps, ga, ckpt):
    dist.init_process_group("gloo")
    if ckpt == "mixed-dtypes":
        return mixed_dtypes(model_dir, out)
    stage = PipelineStage.from_pretrained(model_dir, gradient_checkpointing=ckpt == "1")
    optimizer = torch.optim.SGD(stage.parameters_to_train(), lr=LR)
    history = train_pipeline(stage, micro_batches(), optimizer, grad_accum=int(ga), max_steps=int(steps),
                             progress=False)
    stage.save_shard(os.path.join(out, "shards"))
    record = {"rank": stage.rank, "messages": vars(stage.messages), "history": history,
              "own_layers": list(stage.ranges[stage.rank]),
              "materialised": sum(p.numel() for p in stage.lm.parameters() if not p.is_meta),
              "total": sum(p.numel() for p in stage.lm.parameters())}
    with open(os.path.join(out, f"rank{stage.rank}.json"), "w") as f:
        json.dump(record, f)
    exit_distributed_worker()


if __name__ == "__main__":
    main(*sys.argv[1:])
