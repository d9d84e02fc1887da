"""The synchronous LoPT pipeline loop, and data parallelism across pipeline replicas."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .stage import PipelineStage


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
                   start_step: int = 0) -> list[dict]:
    """The synchronous LoPT pipeline loop: per optimiser step, ``grad_accum`` micro-batches flow through the
    stages (each rank runs forward, sends downstream, runs its local backward, takes the next); then every rank
    steps its own optimiser. ``batches`` yields the same micro-batches on every rank of one pipeline.
    ``data_parallel_group``: the ranks holding the same stage in other pipeline replicas (each fed its own
    share of the global batch); their gradients are averaged before the step. ``start_step``: the steps
    already taken (resume): ``batches`` is the whole stream, the micro-batches those steps consumed are
    skipped. Returns the last rank's log (task loss, and each boundary's aux loss, sent downstream once per
    step)."""
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
        for _ in range(grad_accum):
            batch = next(iterator)
            losses = stage.run_micro_batch(batch, 1.0 / grad_accum)
            task = task + losses.get("task_loss", 0.0) / grad_accum
            aux = aux + losses.get("aux_loss", 0.0) / grad_accum
        with stage._span("send"):
            stage.wait_sends()
        # the boundaries' aux losses travel downstream with the flow: one small message per step and stage
        auxes = torch.zeros(stage.world - 1, dtype=torch.float32, device=stage.device)  # NCCL sends device tensors
        if not stage.is_first:
            stage.receive(auxes, stage.rank - 1)
        if not stage.is_last:
            auxes[stage.rank] = aux
            stage.send(auxes, stage.rank + 1)
        with stage._span("step"):
            if data_parallel_group is not None:
                average_gradients(stage.parameters_to_train(), data_parallel_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if stage.is_last:
            entry = {"step": step + 1, "task_loss": float(task), "aux_loss": [float(a) for a in auxes],
                     "loss": float(task) + stage.lambda_aux * float(auxes.mean())}
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
