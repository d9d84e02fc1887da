"""Two optimiser steps of a patched tiny Llama under transformers.Trainer + DeepSpeed ZeRO + lopt_kernels.attach.

Launched by test_deepspeed.py as ``DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 deepspeed_train.py OUT [CASE ...]``
(gloo, fp32, the Trainer's torch optimizer so that no DeepSpeed op compiles; per-device batch 2, accumulation 2),
or called in-process with ``deepspeed=False`` (one process, per-device batch 4: the same global batch). Every
case runs in the same launch (one DeepSpeed engine after the other). Rank 0 writes each case's final parameters
(gathered from the ZeRO partitions) to OUT/<case>.pt, or OUT/<case>.err with the error a case must raise."""

from __future__ import annotations

import gc
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import lopt_kernels  # noqa: E402
from helpers import RecordingCollator, VariableLengthSequences, exit_distributed_worker  # noqa: E402
from lopt_kernels.integrations import save_aux_decoders  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

GLOBAL_BATCH = 4  # per micro-batch, over all processes


# case names: zero<stage>-<mode>[-lora][-ckpt], activation_free spelled "af"
MODES = {"af": "activation_free", "stored": "stored", "eager": "eager", "auto": "auto", "e2e": "e2e"}

CASES = (
    "zero1-stored",
    "zero2-stored", "zero2-af", "zero2-eager",
    "zero3-stored", "zero3-af", "zero3-eager", "zero3-auto",
    "zero3-af-ckpt", "zero3-eager-ckpt",
    "zero3-stored-lora", "zero3-af-lora", "zero3-eager-lora", "zero3-auto-lora",
)


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # every parameter really partitioned (the default keeps small ones whole on every rank)
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0, stage3_max_live_parameters=0,
                    stage3_max_reuse_distance=0)
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": zero, "fp16": {"enabled": False},
        "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }


def _lora(model):
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    return get_peft_model(model, config)


def _full_params(model, deepspeed: bool) -> dict:
    """Every parameter, whole (gathered from the ZeRO-3 partitions; a collective on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        if deepspeed and hasattr(p, "ds_id"):
            import deepspeed as ds  # noqa: PLC0415

            with ds.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().clone()
        else:
            out[name] = p.detach().clone()
    return out


def run(out_dir: str, name: str, *, deepspeed: bool, initial: dict | None = None) -> dict:
    """The parameters after 2 optimiser steps of case ``name``; ``initial`` (a dict) gets them before training."""
    stage, flags = int(name.split("-")[0][len("zero"):]), name.split("-")[1:]
    mode, lora, ckpt = MODES[flags[0]], "lora" in flags, "ckpt" in flags
    world = int(os.environ.get("WORLD_SIZE", "1")) if deepspeed else 1
    torch.manual_seed(0)
    # the model is built before the TrainingArguments: with a ZeRO-3 config alive, from_config would build it
    # under deepspeed.zero.Init (already partitioned)
    model = tiny_model("llama")
    model.config.use_cache = False
    if lora:
        model = _lora(model)
    if mode != "e2e":
        model = lopt_kernels.patch(model, mode=mode)
    if initial is not None:
        initial.update((n, p.detach().clone()) for n, p in model.named_parameters())
    data = VariableLengthSequences(n=32, min_len=9, max_len=9)  # equal lengths: per-rank padding as in one process
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"run-{name}-{world}"), max_steps=2,
        per_device_train_batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=2, optim="sgd",
        learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        use_cpu=True, seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1,
        disable_tqdm=True, gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        **({"deepspeed": ds_config(stage)} if deepspeed else {}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=RecordingCollator(prompt=3))
    if mode != "e2e":
        lopt_kernels.attach(trainer)
    trainer.train()
    params = _full_params(model, deepspeed)
    if deepspeed and stage == 3 and not lora:
        # the aux decoders as a checkpoint writes them: gathered from the partitions, rank 0 writes
        save_aux_decoders(model, os.path.join(out_dir, f"{name}-decoders"), write=int(os.environ.get("RANK", "0")) == 0)
    if deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

        trainer.accelerator.free_memory()
        del trainer, args
        unset_hf_deepspeed_config()
        gc.collect()
    return params


def main(out_dir: str, names) -> None:
    import deepspeed  # noqa: F401, PLC0415 - fail early (and clearly) when it is missing

    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        try:
            params = run(out_dir, name, deepspeed=True)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            if rank == 0:
                with open(os.path.join(out_dir, f"{name}.err"), "w") as f:
                    f.write(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
            if not isinstance(exc, lopt_kernels.LoptPatchError):
                raise
            continue
        if rank == 0:
            torch.save(params, os.path.join(out_dir, f"{name}.pt"))
    exit_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or CASES)
