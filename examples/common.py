"""Shared pieces of examples/sft.py and examples/grpo.py: arguments, optimiser groups, the final summary."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="local model directory (save_pretrained output, with tokenizer)")
    p.add_argument("--data", required=True, help="local .jsonl or .parquet file")
    p.add_argument("--output_dir", default="out")
    p.add_argument("--method", choices=("e2e", "lopt"), default="lopt")
    p.add_argument("--num_blocks", type=int, default=2)
    p.add_argument("--lambda_aux", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of the final block, norm and head")
    p.add_argument("--local_lr", type=float, default=None,
                   help="LoPT: learning rate of the earlier blocks, embeddings and aux decoders (default: --lr)")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_data(path: str):
    import datasets

    kind = "parquet" if path.endswith(".parquet") else "json"
    return datasets.load_dataset(kind, data_files=path, split="train")


def common_config(args) -> dict:
    return dict(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, logging_steps=1, report_to=[],
        save_strategy="no", seed=args.seed, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding", disable_tqdm=False,
        lr_scheduler_type="constant",
    )


def prepare(model, args):
    """Patch the model for LoPT and return the optimiser (``None``: the trainer's default, for e2e)."""
    if args.method == "e2e":
        return None
    import lopt_kernels

    lopt_kernels.patch(model, num_blocks=args.num_blocks, lambda_aux=args.lambda_aux)
    return torch.optim.AdamW(lopt_kernels.param_groups(model, lr=args.lr, local_lr=args.local_lr))


def train_and_summarise(trainer, args) -> dict:
    """Attach LoPT to the trainer (``--method lopt``), train, then print the summary line, write
    ``output_dir/summary.json`` and save the final (standard) checkpoint."""
    if args.method == "lopt":
        import lopt_kernels

        lopt_kernels.attach(trainer)
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "cpu_rss"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "method": args.method, "steps": trainer.state.global_step, "tokens": tokens,
        "processes": trainer.args.world_size,
        "distributed": getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type)),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None, "seconds": round(elapsed, 2),
        f"peak_memory_mib_{peak_kind}": round(peak, 1),
        "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
    }
    if logs and "aux_loss" in logs[-1]:
        summary.update(last_task_loss=logs[-1]["task_loss"], last_aux_loss=logs[-1]["aux_loss"])
    trainer.save_model(os.path.join(args.output_dir, "final"))  # every process (ZeRO-3 gathers the weights)
    if torch.distributed.is_initialized():  # torchrun / accelerate launch: leave the group before exiting
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not trainer.is_world_process_zero():
        return summary
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stdout, flush=True)
    return summary
