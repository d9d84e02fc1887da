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


# case names: zero<stage>-<mode>[-lora][-ckpt][-<family>], activation_free spelled "af"; the family defaults to llama
MODES = {"af": "activation_free", "stored": "stored", "eager": "eager", "auto": "auto", "e2e": "e2e"}
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "mixtral": ["q_proj", "v_proj"]}

# ZeRO-1 at least trains; ZeRO-2 and ZeRO-3: every mode, full fine-tune and LoRA, with and without checkpointing
CASES = ("zero1-stored",) + tuple(
    f"zero{stage}-{mode}{lora}{ckpt}"
    for stage in (2, 3) for lora in ("", "-lora") for ckpt in ("", "-ckpt") for mode in ("stored", "af", "eager")
) + ("zero3-auto", "zero3-auto-lora",
     # GPT-2 (Conv1D layers, learned positions, tied head): before, eager's local backward started from the last
     # bottom layer's output before ZeRO-3 had hooked it, and ZeRO-3 failed an assertion at the end of that backward
     "zero3-eager-ckpt-gpt2")


def family_of(name: str) -> str:
    return next((f for f in name.split("-")[1:] if f in LORA_TARGETS), "llama")


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


def _lora(model, family="llama"):
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family], lora_dropout=0.0,
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


def run(out_dir: str, name: str, *, deepspeed: bool, initial: dict | None = None, start: dict | None = None) -> dict:
    """The parameters after 2 optimiser steps of case ``name``; ``initial`` (a dict) gets them before training;
    ``start`` (name -> tensor) replaces the initialisation."""
    stage, flags = int(name.split("-")[0][len("zero"):]), name.split("-")[1:]
    mode, lora, ckpt, family = MODES[flags[0]], "lora" in flags, "ckpt" in flags, family_of(name)
    world = int(os.environ.get("WORLD_SIZE", "1")) if deepspeed else 1
    torch.manual_seed(0)
    # the model is built before the TrainingArguments: with a ZeRO-3 config alive, from_config would build it
    # under deepspeed.zero.Init (already partitioned)
    model = tiny_model(family)
    model.config.use_cache = False
    if lora:
        model = _lora(model, family)
    if mode != "e2e":
        model = lopt_kernels.patch(model, mode=mode)
    if start is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
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


# cases beyond "equals one process": TRL's SFTTrainer under ZeRO-3, checkpoint + resume under ZeRO-3, a model
# built partitioned by deepspeed.zero.Init, a pipeline-parallel PipelineModule (refused)
# and eager on a MoE model whose expert blocks DeepSpeed flags as ZeRO-3 leaf modules (refused: zero3-eager-mixtral.err)
# zero3init-auto-gpt2: a tied head (patch unties it from a partitioned embedding)
EXTRA_CASES = ("sft-zero3", "resume-zero3", "zero3init-auto", "zero3init-auto-gpt2", "pipeline", "zero3-eager-mixtral")


def _cleanup(trainer) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: PLC0415

    trainer.accelerator.free_memory()
    unset_hf_deepspeed_config()
    gc.collect()


def sft_zero3(out_dir: str) -> dict:
    """TRL's SFTTrainer + ZeRO-3 + attach, 2 steps: {"before", "after"} parameters (whole)."""
    import datasets  # noqa: PLC0415
    import trl  # noqa: PLC0415

    from helpers import sft_rows, tiny_llm_for, tiny_tokenizer, write_jsonl  # noqa: PLC0415

    rank = int(os.environ.get("RANK", "0"))
    tok = tiny_tokenizer()
    model = lopt_kernels.patch(tiny_llm_for(tok, use_cache=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = write_jsonl(os.path.join(out_dir, f"sft-rank{rank}.jsonl"), sft_rows(16))
    data = datasets.load_dataset("json", data_files=str(rows), split="train")
    args = trl.SFTConfig(output_dir=os.path.join(out_dir, "run-sft"), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=0.0, report_to=[],
                         save_strategy="no", use_cpu=True, seed=0, logging_steps=1, lr_scheduler_type="constant",
                         dataloader_num_workers=0, max_length=32, bf16=False, disable_tqdm=True,
                         deepspeed=ds_config(3))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    lopt_kernels.attach(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    after = _full_params(model, True)
    _cleanup(trainer)
    return {"before": before, "after": after, "aux_loss": [h.get("aux_loss") for h in logs]}


def _resume_args(out_dir: str, run_name: str):
    config = ds_config(3)
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # save_model: whole weights
    return TrainingArguments(
        output_dir=os.path.join(out_dir, run_name), max_steps=4, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=GLOBAL_BATCH // 2, gradient_accumulation_steps=2, optim="adamw_torch",
        learning_rate=1e-2, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], use_cpu=True, seed=0,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, disable_tqdm=True,
        deepspeed=config,
    )


def resume_zero3(out_dir: str) -> dict:
    """ZeRO-3, AdamW: 4 steps straight (checkpoints at 2 and 4), then a fresh run resumed from checkpoint-2 to 4;
    rank 0 also saves the straight run's final model with save_model()."""
    results = {}
    for run_name, resume in (("resume-straight", None), ("resume-resumed", "resume-straight/checkpoint-2")):
        torch.manual_seed(0)
        model = tiny_model("llama")
        model.config.use_cache = False
        model = lopt_kernels.patch(model)
        if resume is not None:  # a different start: the resume must bring back every tensor, decoders included
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        data = VariableLengthSequences(n=32, min_len=9, max_len=9)
        trainer = Trainer(model=model, args=_resume_args(out_dir, run_name), train_dataset=data,
                          data_collator=RecordingCollator(prompt=3))
        lopt_kernels.attach(trainer)
        trainer.train(resume_from_checkpoint=None if resume is None else os.path.join(out_dir, resume))
        results[run_name] = _full_params(model, True)
        if resume is None:
            trainer.save_model(os.path.join(out_dir, "resume-final"))
        _cleanup(trainer)
    return results


def zero3_init(out_dir: str, family: str = "llama") -> dict:
    """A model built partitioned (deepspeed.zero.Init, as from_pretrained does under a live ZeRO-3 config), then
    patched and trained 2 steps: {"initial", "final"} parameters (whole)."""
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"run-zero3init-{family}"), max_steps=2, per_device_train_batch_size=GLOBAL_BATCH // 2,
        gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=0,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, disable_tqdm=True,
        deepspeed=ds_config(3),
    )
    torch.manual_seed(0)
    model = tiny_model(family)  # under the live ZeRO-3 config: built partitioned
    assert all(hasattr(p, "ds_id") for p in model.parameters()), "the model was not built by deepspeed.zero.Init"
    model.config.use_cache = False
    model = lopt_kernels.patch(model)
    initial = _full_params(model, True)  # zero.Init's initialisation is not from_config's: the test starts from it
    trainer = Trainer(model=model, args=args, train_dataset=VariableLengthSequences(n=32, min_len=9, max_len=9),
                      data_collator=RecordingCollator(prompt=3))
    lopt_kernels.attach(trainer)
    trainer.train()
    params = _full_params(model, True)
    _cleanup(trainer)
    return {"initial": initial, "final": params}


def pipeline(out_dir: str) -> dict:
    """patch() on a DeepSpeed PipelineModule: refused (LoptPatchError, recorded in pipeline.err)."""
    from deepspeed.pipe import PipelineModule  # noqa: PLC0415

    module = PipelineModule(layers=[torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)], num_stages=2)
    lopt_kernels.patch(module)
    return {}


def _run_case(out_dir: str, name: str) -> dict:
    if name == "sft-zero3":
        return sft_zero3(out_dir)
    if name == "resume-zero3":
        return resume_zero3(out_dir)
    if name.startswith("zero3init-auto"):
        return zero3_init(out_dir, family_of(name))
    if name == "pipeline":
        return pipeline(out_dir)
    return run(out_dir, name, deepspeed=True)


def main(out_dir: str, names) -> None:
    import deepspeed  # noqa: F401, PLC0415 - fail early (and clearly) when it is missing

    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        try:
            params = _run_case(out_dir, name)
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
    main(sys.argv[1], sys.argv[2:] or CASES + EXTRA_CASES)
