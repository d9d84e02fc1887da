"""The synchronous LoPT pipeline loop, and data parallelism across pipeline replicas."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..discovery import LoptPatchError
from ..task_loss_hooks import label_count
from .stage import PipelineStage

WEIGHTINGS = ("tokens", "mean")


def window_weights(stage: PipelineStage, window: list, weighting: str, data_parallel_group=None):
    """``(loss_weight, num_items_in_batch)`` for each micro-batch of one accumulation window, and the factor that
    turns the window's summed loss shares into this replica's own window loss (for the log).

    "tokens" (HF Trainer's and TRL's weighting, what ``patch`` does with ``num_items_in_batch``): every label
    token of the window weighs the same; ``num_items_in_batch`` is the label-token count of the window on every
    data-parallel replica together, and the loss weight is the replica count (their gradients are averaged, as
    HF Trainer multiplies by the process count under ``average_tokens_across_devices``). "mean" (the LoPT
    reference's ``loss / accumulation_steps``): each micro-batch's mean loss weighs ``1 / grad_accum``. Both
    agree when every micro-batch has the same label-token count."""
    if weighting == "mean":
        return 1.0 / len(window), None, 1.0 / len(window)
    counts = [label_count(b) for b in window]
    if any(c is None for c in counts):
        raise LoptPatchError("weighting='tokens' needs labels in every micro-batch (or use weighting='mean')")
    local = int(sum(int(c) for c in counts))
    total, replicas = local, 1
    if data_parallel_group is not None:
        summed = torch.tensor([local], dtype=torch.int64, device=stage.device)
        dist.all_reduce(summed, group=data_parallel_group)
        total, replicas = int(summed), dist.get_world_size(data_parallel_group)
    return float(replicas), total, (total / local if local else 0.0)


def average_gradients(params, group) -> None:
    """Mean of the gradients over ``group`` (the same stage's data-parallel replicas): one all-reduce per dtype."""
    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def train_pipeline(stage: PipelineStage, batches, optimizer, *, grad_accum: int, max_steps: int, scheduler=None,
                   log_every: int = 1, progress: bool = True, on_log=None, data_parallel_group=None,
                   start_step: int = 0, weighting: str = "tokens") -> list[dict]:
    """The synchronous LoPT pipeline loop: per optimiser step, ``grad_accum`` micro-batches flow through the
    stages (each rank runs forward, sends downstream, runs its local backward, takes the next); then every rank
    steps its own optimiser. ``batches`` yields the same micro-batches on every rank of one pipeline.
    ``data_parallel_group``: the ranks holding the same stage in other pipeline replicas (each fed its own
    share of the global batch); their gradients are averaged before the step. ``start_step``: the steps
    already taken (resume): ``batches`` is the whole stream, the micro-batches those steps consumed are
    skipped. ``weighting``: how the window's micro-batches are weighted, "tokens" (the default: each label token
    alike, as HF Trainer and TRL do) or "mean" (each micro-batch alike, as the LoPT reference does); see
    :func:`window_weights`. Returns the last rank's log (task loss, and each boundary's aux loss, sent
    downstream once per step, as this replica's window means; and the weighting)."""
    if weighting not in WEIGHTINGS:
        raise LoptPatchError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    history = []
    iterator = iter(batches)
    for _ in range(start_step * grad_accum):
        next(iterator)
    bar = None
    if progress and stage.is_last:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=max_steps, initial=start_step, desc="LoPT pipeline")
    for step in range(start_step, max_steps):
        stage.timeline.spans.clear()
        task = torch.zeros((), dtype=torch.float32)
        aux = torch.zeros((), dtype=torch.float32)
        window = [next(iterator) for _ in range(grad_accum)]
        loss_weight, num_items, to_window = window_weights(stage, window, weighting, data_parallel_group)
        for batch in window:
            losses = stage.run_micro_batch(batch, loss_weight, num_items)
            task = task + losses.get("task_loss", 0.0) * to_window
            aux = aux + losses.get("aux_loss", 0.0) * to_window
        with stage.timed_span("send"):
            stage.wait_sends()
        # the boundaries' aux losses travel downstream with the flow: one small message per step and stage
        auxes = torch.zeros(stage.world - 1, dtype=torch.float32, device=stage.device)  # NCCL sends device tensors
        if not stage.is_first:
            stage.receive(auxes, stage.rank - 1)
        if not stage.is_last:
            auxes[stage.rank] = aux
            stage.send(auxes, stage.rank + 1)
        with stage.timed_span("step"):
            if data_parallel_group is not None:
                average_gradients(stage.parameters_to_train(), data_parallel_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if stage.is_last:
            entry = {"step": step + 1, "task_loss": float(task), "aux_loss": [float(a) for a in auxes],
                     "loss": float(task) + stage.lambda_aux * float(auxes.mean()), "weighting": weighting}
            history.append(entry)
            if bar is not None:
                bar.update(1)
                if (step + 1) % log_every == 0:
                    bar.set_postfix(task=f"{entry['task_loss']:.4f}", aux=f"{float(auxes.mean()):.3g}")
            if on_log is not None and (step + 1) % log_every == 0:
                on_log(entry)
    if bar is not None:
        bar.close()
    return history
