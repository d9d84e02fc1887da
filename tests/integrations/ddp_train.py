"""Two optimiser steps of a patched tiny Llama under transformers.Trainer + lopt_kernels.attach.

Launched by test_distributed.py, either as ``torchrun --nproc_per_node 2 ddp_train.py OUT`` (DDP, gloo, CPU;
per-device batch 2) or called in-process with ``world=1`` (one process, per-device batch 4: the same global
batch). Writes the final parameters (rank 0) to OUT/<variant>-world2.pt and the logged (loss, task_loss, aux_loss) of
each step to OUT/<variant>-world2-logs.pt."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import lopt_kernels  # noqa: E402
from helpers import RecordingCollator, VariableLengthSequences, exit_distributed_worker  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

GLOBAL_BATCH = 4  # per micro-batch, over all processes
VARIANTS = ("model_loss", "custom_loss")
LOGS: dict = {}


def _sum_ce(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


def run(out_dir: str, variant: str, world: int) -> dict:
    torch.manual_seed(0)
    # the mode the test session runs (tests/conftest.py), also in the torchrun children
    model = lopt_kernels.patch(tiny_model("llama"), mode=os.environ.get("LOPT_TEST_DEFAULT_MODE", "auto"))
    # equal lengths: the aux loss counts padding positions, so per-rank padding must not differ from one process's
    data = VariableLengthSequences(n=32, min_len=9, max_len=9)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"run-{variant}-{world}"), max_steps=2,
        per_device_train_batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=2, optim="sgd",
        learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        use_cpu=True, seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1,
        disable_tqdm=True, **({"ddp_backend": "gloo"} if world > 1 else {}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=RecordingCollator(prompt=3),
                      compute_loss_func=_sum_ce if variant == "custom_loss" else None)
    lopt_kernels.attach(trainer)
    trainer.train()
    # the logged task and aux losses (LoptCallback), averaged over the processes as the Trainer's "loss" is
    LOGS[variant] = [(h["loss"], h["task_loss"], h["aux_loss"]) for h in trainer.state.log_history if "aux_loss" in h]
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for variant in VARIANTS:
        params = run(out_dir, variant, world)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(params, os.path.join(out_dir, f"{variant}-world{world}.pt"))
            torch.save(LOGS[variant], os.path.join(out_dir, f"{variant}-world{world}-logs.pt"))
    if world > 1:
        exit_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1])
