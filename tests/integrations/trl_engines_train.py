"""TRL trainers + ``lopt_kernels.attach`` under the distributed engines as a user configures them, launched by
test_trl_engines.py as ``torchrun --nproc_per_node 2 trl_engines_train.py OUT ENGINE`` (gloo, CPU, fp32), or called
in-process with ``world=1`` (one process without the engine, the same global batch):

- ``fsdp2``: ``SFTTrainer`` and ``GRPOTrainer`` with ``fsdp_config={"fsdp_version": 2}`` (accelerate's own FSDP2
  preparation, let onto CPU as hf_trainer_fsdp2_train.py does): SFT a full fine-tune of Qwen2 (tied head, untied by
  patch) and LoRA on Llama, GRPO a full fine-tune and LoRA on Llama;
- ``ddp``: ``GRPOTrainer`` + LoRA (DDP), rollouts made deterministic by a logits processor that picks each token from
  the row's content and its place in its group (no EOS: every completion has the same length);
- ``zero``: ``SFTTrainer`` under DeepSpeed ZeRO-3 (GPT-2: Conv1D, learned positions, tied head) and ZeRO-2 (Phi-3
  LoRA), ``GRPOTrainer`` (full fine-tune and LoRA, Llama) under ZeRO-2.

SFT and GRPO keep their defaults (gradient checkpointing on, SFT's fused LM head, GRPO's ``dapo`` loss). Each case
trains 3 (SFT) or 2 (GRPO) optimiser steps of 2 accumulated micro-batches; rank 0 writes the trainable parameters
(gathered) to OUT/<case>.pt, and a count of the modules or parameters the engine took over to OUT/<case>.engine."""

from __future__ import annotations

import gc
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lopt_kernels  # noqa: E402
from helpers import exit_distributed_worker, sft_rows, tiny_tokenizer  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

# case: (engine, trainer, family, LoRA targets or None, mode)
CASES = {
    "sft-fsdp2-qwen2": ("fsdp2", "sft", "qwen2", None, "auto"),
    "sft-fsdp2-llama-lora": ("fsdp2", "sft", "llama", ["q_proj", "v_proj", "down_proj"], "auto"),
    "grpo-ddp-llama-lora": ("ddp", "grpo", "llama", ["q_proj", "v_proj", "down_proj"], "auto"),
    "sft-zero3-gpt2": ("zero3", "sft", "gpt2", None, "auto"),
    "sft-zero2-phi3-lora": ("zero2", "sft", "phi3", ["qkv_proj", "down_proj"], "auto"),
    "grpo-zero2-llama-lora": ("zero2", "grpo", "llama", ["q_proj", "v_proj", "down_proj"], "auto"),
    "grpo-fsdp2-llama": ("fsdp2", "grpo", "llama", None, "auto"),
    "grpo-fsdp2-llama-lora": ("fsdp2", "grpo", "llama", ["q_proj", "v_proj", "down_proj"], "auto"),
    "grpo-zero2-llama": ("zero2", "grpo", "llama", None, "auto"),
}
GLOBAL_BATCH, GA, LR, G = 4, 2, 0.05, 4
WORDS = "the cat dog sat ran on a mat log red blue big small one two three four five six seven eight nine ten".split()


def sft_data(steps=3):
    """4 rows per global micro-batch share their prompt and completion lengths (every rank holds the same share of the
    window's label tokens, and no padding); the lengths change from one micro-batch to the next."""
    import datasets  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    rows = []
    for mb in range(GA * steps):
        p, c = 2 + mb % 3, 2 + (mb * 2) % 5
        for _ in range(GLOBAL_BATCH):
            w = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (p + c,), generator=g)]
            rows.append({"prompt": " ".join(w[:p]), "completion": " " + " ".join(w[p:])})
    return datasets.Dataset.from_list(rows)


def _forced_rollouts():
    from transformers import LogitsProcessor  # noqa: PLC0415

    class Forced(LogitsProcessor):
        """Each next token from the row's tokens so far and its place in its group of G: the same completions on one
        process and on two, different ones within a group (so the advantages are not all zero)."""

        def __call__(self, input_ids, scores):
            rows = torch.arange(input_ids.shape[0])
            key = (input_ids * torch.arange(1, input_ids.shape[1] + 1)).sum(1) * 31 + (rows % G) * 7
            forced = torch.full_like(scores, float("-inf"))
            forced[rows, 4 + (key + 3 * input_ids.shape[1]) % 30] = 0.0
            return forced

    return Forced()


def _reward(completions, **kwargs):
    nums = set("one two three four five six seven eight nine ten".split())
    return [float(sum(w in nums for w in str(c).split())) + 0.1 * len(str(c)) for c in completions]


def _model(family, lora, mode):
    model = tiny_model(family)
    model.config.use_cache = False
    model.generation_config.pad_token_id = 0
    if lora:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora,
                                                 init_lora_weights=False))
    return lopt_kernels.patch(model, mode=mode)


def _whole(p):
    if hasattr(p, "full_tensor"):  # FSDP2
        return p.full_tensor().detach().clone()
    if hasattr(p, "ds_id"):  # ZeRO-3
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone()
    return p.detach().clone()


def run(out: str, case: str, world: int) -> tuple[dict, int]:
    """The trainable parameters after training ``case`` on ``world`` processes (gathered), and how many modules
    (FSDP2) or parameters (ZeRO-3; ZeRO-2: 1) the engine took over."""
    import trl  # noqa: PLC0415

    engine, kind, family, lora, mode = CASES[case]
    tok = tiny_tokenizer()
    model = _model(family, lora, mode)  # before the TrainingArguments (a live ZeRO-3 config partitions from_config)
    common = dict(output_dir=os.path.join(out, f"run-{case}-{world}"), gradient_accumulation_steps=GA, optim="sgd",
                  learning_rate=LR, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                  use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=False, logging_steps=1)
    if world > 1:
        common["ddp_backend"] = "gloo"
        if engine == "fsdp2":
            common.update(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
        elif engine.startswith("zero"):
            from deepspeed_train import ds_config  # noqa: PLC0415

            common["deepspeed"] = ds_config(int(engine[-1]))
    if kind == "sft":
        args = trl.SFTConfig(max_steps=3, per_device_train_batch_size=GLOBAL_BATCH // world, max_length=32,
                             train_sampling_strategy="sequential", **common)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tok)
    else:
        import datasets  # noqa: PLC0415
        from transformers import LogitsProcessorList  # noqa: PLC0415

        tok.padding_side = "left"
        generate = model.generate
        model.generate = lambda *a, **k: generate(*a, logits_processor=LogitsProcessorList([_forced_rollouts()]), **k)
        data = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in sft_rows(16, seed=1)])
        args = trl.GRPOConfig(max_steps=2, per_device_train_batch_size=2 * GLOBAL_BATCH // world, num_generations=G,
                              max_completion_length=4, temperature=1.0, beta=0.0, **common)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data,
                                  processing_class=tok)
    lopt_kernels.attach(trainer)
    trainer.train()
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    if engine == "fsdp2":
        took = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
    elif engine.startswith("zero"):
        took = max(int(getattr(trainer, "is_deepspeed_enabled", False)),
                   sum(hasattr(p, "ds_id") for p in trainer.model.parameters()))
    else:
        took = int(isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel))
    params = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            params[name.removeprefix("module.")] = _whole(p)
    if world > 1 and engine.startswith("zero"):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

        trainer.accelerator.free_memory()
        unset_hf_deepspeed_config()
    del trainer
    gc.collect()
    return params, took


def main(out: str, engine: str) -> None:
    if engine == "fsdp2":
        from hf_trainer_fsdp2_train import enable_fsdp_on_cpu  # noqa: PLC0415

        enable_fsdp_on_cpu()
    for case, spec in CASES.items():
        if spec[0] != engine and not (engine == "zero" and spec[0].startswith("zero")):
            continue
        params, took = run(out, case, int(os.environ["WORLD_SIZE"]))
        if int(os.environ["RANK"]) == 0:
            torch.save(params, os.path.join(out, f"{case}.pt"))
            with open(os.path.join(out, f"{case}.engine"), "w") as f:
                f.write(str(took))
    exit_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
