"""Reading a pipeline stage's tensors, resumable checkpoints, and joining the ranks' shards."""

from __future__ import annotations

import contextlib
import json
import os

import torch

from ..discovery import AUX_DECODERS_ATTR, LoptPatchError

SHARD_PREFIX = "lopt_pipeline_shard"


ADAPTER_PREFIX = "base_model.model."


def _adapter_key(name: str) -> str:
    """``model.layers.0.q_proj.lora_A.default.weight`` -> PEFT's saved
    ``base_model.model.model.layers.0.q_proj.lora_A.weight``: the adapter name is dropped where PEFT drops it,
    second to last (a module's tensor) or last (a parameter's: an embedding's ``lora_embedding_A.default``), never
    inside a module path."""
    if name.endswith(".default"):
        return ADAPTER_PREFIX + name[: -len(".default")]
    head, _, suffix = name.rpartition(".")
    return ADAPTER_PREFIX + head.removesuffix(".default") + "." + suffix


def model_key(name: str) -> str:
    """The model's own name of a tensor of a PEFT-wrapped model: its base tensors (``<layer>.base_layer.weight``,
    ``base_layer`` nested once per wrapper where several parameters of one module are adapted) under the unwrapped
    model's name; a LoRA tensor keeps its name, whose ``base_layer`` parts tell the wrappers apart."""
    if ".lora_" in name:
        return name
    return ".".join(part for part in name.split(".") if part != "base_layer")


def check_adapter(adapter_dir: str):
    """The PEFT config of ``adapter_dir`` if the pipeline can train it (LoRA matrices only); a clear error if not."""
    from peft import PeftConfig  # noqa: PLC0415

    config = PeftConfig.from_pretrained(adapter_dir)
    if getattr(config, "peft_type", None) is None or str(config.peft_type) not in ("LORA", "PeftType.LORA"):
        raise LoptPatchError(f"{adapter_dir}: only LoRA adapters are supported by the pipeline, got {config.peft_type}")
    extras = {k: v for k, v in (("modules_to_save", getattr(config, "modules_to_save", None)),
                                 ("trainable_token_indices", getattr(config, "trainable_token_indices", None)),
                                 ("bias", None if getattr(config, "bias", "none") == "none" else config.bias)) if v}
    if extras:
        raise LoptPatchError(
            f"{adapter_dir}: the pipeline trains, loads and saves the LoRA matrices only, but this adapter also has "
            f"{extras}: those would stay untrained and be left out of the joined adapter. Train it in one process "
            "(lopt_kernels.patch on the PEFT model), or save the adapter without them."
        )
    return config


def inject_adapter(lm, adapter_dir: str, index: dict, device) -> None:
    """LoRA layers from ``adapter_dir`` in ``lm`` (frozen base): this rank's from the adapter's (or a pipeline
    checkpoint's) tensors; the rest stay on the meta device with the layers they adapt."""
    from peft import inject_adapter_in_model  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    config = check_adapter(adapter_dir)
    inject_adapter_in_model(config, lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    with contextlib.ExitStack() as files, torch.no_grad():
        saved = files.enter_context(safe_open(path, "pt", device=str(device))) if os.path.isfile(path) else None
        keys = set(saved.keys()) if saved is not None else set()
        for name, p in lm.named_parameters():
            if ".lora_" not in name:
                continue
            p.requires_grad_(True)
            if p.is_meta:
                continue
            if name in index:  # resuming from a pipeline checkpoint
                with safe_open(index[name], "pt", device=str(device)) as f:
                    p.copy_(f.get_tensor(name))
            elif _adapter_key(name) in keys:
                p.copy_(saved.get_tensor(_adapter_key(name)))
            else:
                raise LoptPatchError(f"{adapter_dir} has no LoRA tensor for {name} ({_adapter_key(name)})")


def safetensors_index(model_dir: str) -> dict[str, str]:
    """Tensor name -> file, for a save_pretrained directory (one file or sharded) or a pipeline checkpoint
    (the ranks' shards)."""
    from safetensors import safe_open  # noqa: PLC0415

    shards = sorted(f for f in os.listdir(model_dir) if f.startswith(SHARD_PREFIX) and f.endswith(".safetensors"))
    if shards:
        out = {}
        for name in shards:
            path = os.path.join(model_dir, name)
            with safe_open(path, "pt") as f:
                out.update((k, path) for k in f.keys())
        return out
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise LoptPatchError(f"{model_dir} has no model.safetensors (save the model with save_pretrained)")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _state_file(directory: str, rank: int, world: int) -> str:
    return os.path.join(directory, f"lopt_pipeline_state-{rank}-of-{world}.pt")


def save_checkpoint(stage, directory: str, optimizer, *, step: int, scheduler=None) -> None:
    """This rank's part of a resumable checkpoint: its shard, its optimiser (and scheduler) state and the step.
    ``PipelineStage.from_pretrained(directory)`` and :func:`load_training_state` resume from it."""
    stage.save_shard(directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": None if scheduler is None else scheduler.state_dict(),
                "step": step, "random_state": stage.random_state()}, _state_file(directory, stage.rank, stage.world))


def load_training_state(stage, directory: str, optimizer, scheduler=None) -> int:
    """Restore this rank's optimiser (and scheduler) state from :func:`save_checkpoint`; returns the step to
    pass to ``train_pipeline(start_step=...)``."""
    path = _state_file(directory, stage.rank, stage.world)
    if not os.path.isfile(path):
        raise LoptPatchError(f"{path} does not exist: not a pipeline checkpoint of {stage.world} stages")
    state = torch.load(path, map_location=stage.device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("random_state") is not None:  # dropout goes on drawing where the checkpointed run stopped
        stage.set_random_state(state["random_state"])
    return int(state["step"])


def join_shards(shard_dir: str, out_dir: str) -> str:
    """Join the ranks' shards in ``shard_dir`` into one standard Hugging Face checkpoint in ``out_dir``
    (``config.json`` + ``model.safetensors``, untied head, no aux decoders), or, for a LoRA run, into the
    trained PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``); returns ``out_dir``."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415
    from transformers import AutoConfig  # noqa: PLC0415

    files = sorted(f for f in os.listdir(shard_dir) if f.startswith(SHARD_PREFIX))
    if not files:
        raise LoptPatchError(f"{shard_dir} holds no {SHARD_PREFIX}-*.safetensors files")
    worlds = {int(f.rsplit("-of-", 1)[1].split(".")[0]) for f in files}
    if len(worlds) != 1 or len(files) != next(iter(worlds)):
        raise LoptPatchError(f"{shard_dir}: incomplete or mixed shard set {files}")
    state = {}
    for f in files:
        state.update((k, v) for k, v in load_file(os.path.join(shard_dir, f)).items()
                     if not k.startswith(f"{AUX_DECODERS_ATTR}."))
    if os.path.isfile(os.path.join(shard_dir, "adapter_config.json")):  # LoRA: the trained adapter, PEFT's format
        import shutil  # noqa: PLC0415

        os.makedirs(out_dir, exist_ok=True)
        shutil.copy(os.path.join(shard_dir, "adapter_config.json"), out_dir)
        adapter = {_adapter_key(k): v for k, v in state.items() if ".lora_" in k}
        save_file(adapter, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
        return out_dir
    config = AutoConfig.from_pretrained(shard_dir)
    config.tie_word_embeddings = False  # the head trained on its own (LoPT unties it)
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
