"""Supervised fine-tuning as a LoPT pipeline: one block per process, activations flow one way, fully offline.

    torchrun --nproc_per_node 2 examples/pipeline_sft.py --model ./my-model --data train.jsonl \
        --lr 1e-5 --max_steps 200 --micro_batch 4 --grad_accum 8 --output_dir out/pipeline
    # add --adapter ./my-lora to train a PEFT LoRA adapter instead of the full model;
    # --resume out/pipeline/checkpoint-100 to continue a run

Each process builds only its block of the model (rank 0 also the embeddings, the last rank the norm and head),
trains it with its own AdamW and writes its shard; at the end rank 0 joins the shards into a standard Hugging
Face checkpoint in ``OUTPUT_DIR/final`` (or the trained adapter). The data file holds
``{"prompt": ..., "completion": ...}`` rows (loss on the completion) or ``{"text": ...}`` rows; every process
reads it and draws the same shuffled micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model directory (save_pretrained output, with tokenizer)")
    p.add_argument("--data", required=True, help="local .jsonl file")
    p.add_argument("--output_dir", default="out/pipeline")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to train (base frozen)")
    p.add_argument("--boundaries", default=None, help="first layer of each stage after the first, e.g. 10,20")
    p.add_argument("--lambda_aux", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=4)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--save_steps", type=int, default=0, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", default=None, help="a checkpoint-N directory of an earlier run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def rows_of(path: str, tokenizer, max_length: int) -> list[dict]:
    """input_ids and labels per row (-100 on the prompt)."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" in row:
                prompt, completion = "", row["text"]
            else:
                prompt, completion = row["prompt"], row["completion"]
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            c_ids = tokenizer(" " + completion if prompt else completion, add_special_tokens=False)["input_ids"]
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = (bos + p_ids + c_ids + eos)[:max_length]
            labels = ([-100] * (len(bos) + len(p_ids)) + c_ids + eos)[:max_length]
            out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise SystemExit(f"{path}: no rows")
    return out


def micro_batches(rows, size: int, pad_id: int, seed: int):
    """Endless shuffled micro-batches, the same on every process (right padding, attention mask)."""
    import torch

    epoch = 0
    while True:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(0, len(order) - size + 1, size):
            chunk = [rows[j] for j in order[i: i + size]]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((size, width), pad_id, dtype=torch.long)
            labels = torch.full((size, width), -100, dtype=torch.long)
            mask = torch.zeros((size, width), dtype=torch.long)
            for k, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[k, :n], labels[k, :n], mask[k, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask}
        epoch += 1


def main(argv=None) -> dict | None:
    args = parse(argv)
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    from lopt_kernels.pipeline import (PipelineStage, join_shards, load_training_state, save_checkpoint,
                                       train_pipeline)

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = rows_of(args.data, tokenizer, args.max_length)
    source = args.resume or args.model
    stage = PipelineStage.from_pretrained(
        source, boundaries=[int(b) for b in args.boundaries.split(",")] if args.boundaries else None,
        lambda_aux=args.lambda_aux, dtype=torch.bfloat16 if args.bf16 else torch.float32, device=device,
        gradient_checkpointing=args.gradient_checkpointing,
        adapter=(args.resume if args.resume and args.adapter else args.adapter),
    )
    optimizer = torch.optim.AdamW(stage.parameters_to_train(), lr=args.lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
    start = load_training_state(stage, args.resume, optimizer, scheduler) if args.resume else 0
    data = micro_batches(rows, args.micro_batch, tokenizer.pad_token_id or 0, args.seed)
    data = ({k: v.to(device) for k, v in b.items()} for b in data)
    started = time.perf_counter()
    history, step = [], start
    while step < args.max_steps:  # in chunks of save_steps, with a checkpoint after each
        until = min(args.max_steps, step + args.save_steps) if args.save_steps else args.max_steps
        history += train_pipeline(stage, data, optimizer, grad_accum=args.grad_accum, max_steps=until,
                                  scheduler=scheduler, start_step=step, progress=True)
        if args.save_steps and until < args.max_steps:
            save_checkpoint(stage, os.path.join(args.output_dir, f"checkpoint-{until}"), optimizer, step=until,
                            scheduler=scheduler)
        step = until
        data = micro_batches(rows, args.micro_batch, tokenizer.pad_token_id or 0, args.seed)  # restart, skip consumed
        data = ({k: v.to(device) for k, v in b.items()} for b in data)
    elapsed = time.perf_counter() - started
    stage.save_shard(os.path.join(args.output_dir, "shards"))
    dist.barrier()
    summary = None
    if stage.is_first:
        final = join_shards(os.path.join(args.output_dir, "shards"), os.path.join(args.output_dir, "final"))
        if not args.adapter:
            tokenizer.save_pretrained(final)
    if stage.is_last:
        summary = {"stages": stage.world, "steps": step, "seconds": round(elapsed, 2),
                   "first_task_loss": history[0]["task_loss"] if history else None,
                   "last_task_loss": history[-1]["task_loss"] if history else None,
                   "last_aux_loss": history[-1]["aux_loss"] if history else None,
                   "messages_upstream": stage.messages.upstream_sends}
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
