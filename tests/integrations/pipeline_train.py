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
from tiny_models import batch, with_old_checkpoint_call  # noqa: E402

LR = 0.5  # plain SGD: parameters stay linear in the gradients, so equality is at rounding level


def micro_batches(packed: bool = False, token_types: bool = False):
    """The same micro-batches on every rank (and in the single-process reference); ``packed``: padding-free rows
    of two sequences each (position ids restarting at the second, no attention mask), as
    DataCollatorWithFlattening builds them; ``token_types``: with segment ids (0 for a 4-token prompt, then 1)."""
    i = 0
    while True:
        b = batch(batch_size=2, seq=9 + i % 3, seed=100 + i, pad_lengths=(0, 2))
        if packed:
            ids = b["input_ids"][:1].clone()
            cut = ids.shape[1] // 2
            labels = ids.clone()
            labels[0, [0, cut]] = -100
            positions = torch.cat([torch.arange(cut), torch.arange(ids.shape[1] - cut)])[None]
            b = {"input_ids": ids, "position_ids": positions, "labels": labels}
        if token_types:
            b["token_type_ids"] = (torch.arange(b["input_ids"].shape[1]) >= 4).long().expand_as(b["input_ids"])
        yield b
        i += 1


def refused(model_dir, out, case: str):
    """Every rank must raise the same clear error before compute: "mixed-dtypes", rank 1 started in bf16 and the
    others in fp32; "refused-adapter", a stage the adapter (``model_dir``/adapter) leaves with nothing to train;
    "refused-batch-keys", a micro-batch with a key the stages would not pass to the model; otherwise a model (or
    checkpoint) that the stages cannot place."""
    import lopt_kernels  # noqa: PLC0415

    rank = dist.get_rank()
    try:
        stage = PipelineStage.from_pretrained(
            model_dir, dtype=torch.bfloat16 if case == "mixed-dtypes" and rank == 1 else torch.float32,
            adapter=os.path.join(model_dir, "adapter") if case == "refused-adapter" else None)
        if case == "refused-batch-keys":
            stage.run_micro_batch({**next(micro_batches()), "output_router_logits": True}, 1.0)
    except lopt_kernels.LoptPatchError as exc:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(str(exc))
    exit_distributed_worker()


def families(parent, out, steps, ga):
    """One stage per rank for every model directory under ``parent`` (one family each), trained in turn: SGD,
    ``steps`` steps of ``ga`` padded micro-batches, token-weighted; each family's shards to ``out/<family>``."""
    for name in sorted(os.listdir(parent)):
        stage = PipelineStage.from_pretrained(os.path.join(parent, name),
                                              attn_implementation="eager" if name.startswith(("gemma", "granite", "bloom"))
                                              else None)
        optimizer = torch.optim.SGD(stage.parameters_to_train(), lr=LR)
        train_pipeline(stage, micro_batches(), optimizer, grad_accum=int(ga), max_steps=int(steps), progress=False)
        stage.save_shard(os.path.join(out, name))
        dist.barrier()
    exit_distributed_worker()


def dropout(model_dir, out, steps, ga):
    """A model with dropout, every rank seeded alike: the first micro-batch's dropout masks in this stage's first
    layer, and the shards of two runs from the same seed (``run0``, ``run1``)."""
    masks = []

    def record(module, args, output):
        if not masks:
            masks.append(((output == 0) & (args[0] != 0)).flatten().tolist())

    for run in range(2):
        torch.manual_seed(0)
        stage = PipelineStage.from_pretrained(model_dir)
        drops = [m for m in stage.own_layers[0].modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        handle = drops[-1].register_forward_hook(record) if run == 0 else None
        optimizer = torch.optim.SGD(stage.parameters_to_train(), lr=LR)
        train_pipeline(stage, micro_batches(), optimizer, grad_accum=int(ga), max_steps=int(steps), progress=False)
        if handle is not None:
            handle.remove()
        stage.save_shard(os.path.join(out, f"run{run}"))
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"mask": masks[0], "drawn": torch.rand(3).tolist()}, f)
    exit_distributed_worker()


def replica_share(replica, replicas, ga):
    """Replica ``replica``'s micro-batches: step s of the global stream holds ``replicas * ga`` micro-batches,
    the replica takes its consecutive ``ga`` of them."""
    for i, b in enumerate(micro_batches()):
        if (i // ga) % replicas == replica:
            yield b


def resume(model_dir, out, steps, ga):
    """AdamW: ``steps`` straight, then a fresh stage from a checkpoint taken half-way, resumed to ``steps``."""
    from lopt_kernels.pipeline import load_training_state, save_checkpoint  # noqa: PLC0415

    def build(source):
        stage = PipelineStage.from_pretrained(source)
        optimizer = torch.optim.AdamW(stage.parameters_to_train(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        return stage, optimizer, scheduler

    steps, ga, half = int(steps), int(ga), int(steps) // 2
    stage, optimizer, scheduler = build(model_dir)
    train_pipeline(stage, micro_batches(), optimizer, grad_accum=ga, max_steps=steps, scheduler=scheduler,
                   progress=False)
    stage.save_shard(os.path.join(out, "straight"))
    stage, optimizer, scheduler = build(model_dir)
    train_pipeline(stage, micro_batches(), optimizer, grad_accum=ga, max_steps=half, scheduler=scheduler,
                   progress=False)
    save_checkpoint(stage, os.path.join(out, "checkpoint"), optimizer, step=half, scheduler=scheduler)
    dist.barrier()
    stage, optimizer, scheduler = build(os.path.join(out, "checkpoint"))
    start = load_training_state(stage, os.path.join(out, "checkpoint"), optimizer, scheduler)
    train_pipeline(stage, micro_batches(), optimizer, grad_accum=ga, max_steps=steps, scheduler=scheduler,
                   progress=False, start_step=start)
    stage.save_shard(os.path.join(out, "resumed"))
    exit_distributed_worker()


def main(model_dir, out, steps, ga, ckpt):
    dist.init_process_group("gloo")
    if ckpt in ("mixed-dtypes", "refused", "refused-adapter", "refused-batch-keys"):
        return refused(model_dir, out, ckpt)
    if ckpt == "resume":
        return resume(model_dir, out, steps, ga)
    if ckpt == "families":
        return families(model_dir, out, steps, ga)
    if ckpt == "dropout":
        return dropout(model_dir, out, steps, ga)
    data, group, dp_group = micro_batches(packed=ckpt == "packed", token_types=ckpt == "token_types"), None, None
    if ckpt == "dp":  # 2 pipeline replicas x 2 stages: pipelines {0, 1}, {2, 3}; data parallel {0, 2}, {1, 3}
        rank = dist.get_rank()
        pipelines = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        replicas = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        group, dp_group = pipelines[rank // 2], replicas[rank % 2]
        data = replica_share(rank // 2, 2, int(ga))
    adapter = os.path.join(model_dir, "adapter") if ckpt == "lora" else None
    dtype = torch.float16 if ckpt == "fp16" else torch.float32
    stage = PipelineStage.from_pretrained(model_dir, gradient_checkpointing=ckpt in ("1", "oldcall"), group=group,
                                          adapter=adapter, dtype=dtype,
                                          attn_implementation="eager" if ckpt == "gemma2" else "sdpa",
                                          aux_mask="tokens" if ckpt == "aux_tokens" else "all")
    if ckpt == "oldcall":  # transformers < 5.23's checkpointing of the layers' whole __call__, hooks included
        with_old_checkpoint_call(stage.own_layers)
    optimizer = torch.optim.SGD(stage.parameters_to_train(), lr=LR)
    history = train_pipeline(stage, data, optimizer, grad_accum=int(ga), max_steps=int(steps),
                             progress=False, data_parallel_group=dp_group,
                             weighting="mean" if ckpt == "mean" else "tokens")
    if dp_group is not None and dist.get_rank() >= 2:  # replica 1 equals replica 0: only replica 0 writes
        exit_distributed_worker()
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
