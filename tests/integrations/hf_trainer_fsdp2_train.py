"""HF Trainer + ``lopt_kernels.attach`` under FSDP2 as a user configures it (``fsdp_config={"fsdp_version": 2, ...}``:
accelerate's own FSDP2 preparation, which shards each decoder layer, the input embedding and a tail group of the
final norm and the output head), launched by test_distributed.py on 2 CPU processes over gloo.

accelerate enables FSDP only on accelerator device types (on CPU it falls back to DDP); ``enable_fsdp_on_cpu``
lets its FSDP2 path run here unchanged, on gloo. Each case trains 3 optimiser steps of 2 accumulated micro-batches
(per-device batch 2, sequential data, token-weighted as the Trainer does), with transformers' checkpointing
or fsdp_config's (torch's checkpoint_wrapper around each layer, put in place after patch) and rank 0 writes its parameters
(gathered) to OUT/<case>.pt and whether the training forwards ran the fused task loss (no logits) to
OUT/<case>.fused; test_distributed.py compares them with one process without FSDP (``run(world=1)``).

Also, outside the Trainer: an output head sharded on its own with ``reshard_after_forward=True`` (its whole weight
is freed when its forward ends) turns the fused task loss off with a notice, and still trains as one process
-> OUT/head_resharded.pt, OUT/head_resharded.notice."""

from __future__ import annotations

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import lopt_kernels  # noqa: E402
from helpers import exit_distributed_worker  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

CASES = {  # name: (mode, LoRA, checkpointing: None, "hf" (gradient_checkpointing) or "fsdp" (fsdp_config's), bf16,
    #                more fsdp_config, family (default llama))
    "eager": ("eager", False, None, False),
    "eager_ckpt": ("eager", False, "hf", False),
    "activation_free": ("activation_free", False, None, False),
    "auto_lora": ("auto", True, None, False),
    # accelerate wraps each layer in torch's checkpoint_wrapper in place, after patch
    "eager_fsdp_ckpt": ("eager", False, "fsdp", False),
    "activation_free_fsdp_ckpt": ("activation_free", False, "fsdp", False),
    "stored_fsdp_ckpt": ("stored", False, "fsdp", False),
    # bf16=True: FSDP2's MixedPrecisionPolicy (bf16 parameters in compute) against one process under bf16 autocast
    "eager_bf16": ("eager", False, None, True),
    # rank 0 loads the weights, the others start on the meta device and receive them; parameters offloaded to CPU
    "eager_ram_efficient_loading": ("eager", False, None, False, {"cpu_ram_efficient_loading": True}),
    "activation_free_offload": ("activation_free", False, None, False, {"offload_params": True}),
    # GPT-2 (Conv1D, learned positions, tied head untied by patch) and Qwen2 (tied)
    "gpt2_eager": ("eager", False, None, False, {}, "gpt2"),
    "qwen2_activation_free": ("activation_free", False, None, False, {}, "qwen2"),
}
GLOBAL_BATCH, GA, STEPS, LR = 4, 2, 3, 0.05


def enable_fsdp_on_cpu() -> None:
    """Let accelerate take its FSDP path on CPU processes (it checks for accelerator device types only). Each later
    ``AcceleratorState()`` (GRPOTrainer's ``set_seed(device_specific=True)`` before ``prepare``, accelerate's
    ``autocast`` and optimizer wrapper) copies PartialState's ``MULTI_CPU`` back over the shared state, so every
    construction that finds an FSDP plugin there sets ``FSDP`` again (else ``prepare`` wraps the model in DDP)."""
    import accelerate.state as accelerate_state  # noqa: PLC0415
    from accelerate.utils import DistributedType  # noqa: PLC0415

    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin
            if fsdp_plugin is not None and self._mixed_precision != "no":  # what accelerate does for accelerators
                fsdp_plugin.set_mixed_precision(self._mixed_precision)

    accelerate_state.AcceleratorState.__init__ = init


class Rows(torch.utils.data.Dataset):
    """Fixed-length rows (no padding: per-rank rows equal one process's) whose prompts (labels -100) differ in length
    from one global micro-batch to the next and are alike within one, so that every rank holds the same share of the
    window's label tokens (the aux term is weighted per micro-batch and process)."""

    def __init__(self, n=GLOBAL_BATCH * GA * STEPS, seq=10):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, 97, (n, seq), generator=g)
        self.prompt = torch.randint(0, 6, (n // GLOBAL_BATCH,), generator=g).repeat_interleave(GLOBAL_BATCH)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: int(self.prompt[i])] = -100
        return {"input_ids": self.ids[i], "labels": labels, "attention_mask": torch.ones_like(self.ids[i])}


def _model(mode, lora, family="llama"):
    model = tiny_model(family)
    if lora:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    return lopt_kernels.patch(model, mode=mode)


def run(out: str, case: str, world: int) -> tuple[dict, bool]:
    """The trainable parameters after training ``case`` (gathered), and whether its forwards ran the fused loss."""
    mode, lora, ckpt, bf16, *more = CASES[case]
    model = _model(mode, lora, more[1] if len(more) > 1 else "llama")
    args = dict(output_dir=os.path.join(out, f"run-{case}-{world}"), max_steps=STEPS,
                per_device_train_batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=GA, optim="sgd",
                learning_rate=LR, max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0,
                disable_tqdm=True, bf16=bf16, gradient_checkpointing=ckpt == "hf",
                gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt == "hf" else None)
    if world > 1:
        args.update(fsdp=True, ddp_backend="gloo",
                    # the layers to shard: the model's _no_split_modules, as accelerate reads them by default
                    fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                 "activation_checkpointing": ckpt == "fsdp", **(more[0] if more else {})})
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=Rows())
    lopt_kernels.attach(trainer)
    logits_seen = []
    lm = model.get_base_model() if lora else model
    lm.register_forward_hook(lambda m, a, out: logits_seen.append(out.logits is not None) if m.training else None)
    trainer.train()
    if world > 1:  # accelerate sharded each decoder layer (and wrapped it for fsdp_config's checkpointing)
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

        stack = lm.model.layers if hasattr(lm, "model") else lm.transformer.h
        assert all(isinstance(layer, FSDPModule) for layer in stack), [type(layer).__name__ for layer in stack]
        assert (type(stack[0]).__name__ == "FSDPCheckpointWrapper") == (ckpt == "fsdp"), type(stack[0]).__name__
    params = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            name = name.replace("._checkpoint_wrapped_module", "")  # fsdp_config's checkpoint wrapper
            params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return params, not any(logits_seen)


def head_resharded(world: int, rank: int) -> tuple[dict, list[str]]:
    """Own loop: layers and the output head sharded each on their own, reshard_after_forward=True."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model = _model("eager", False)
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    data, per_rank = Rows(), GLOBAL_BATCH // world
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            rows = [[data[(step * GA + i) * GLOBAL_BATCH + r] for r in range(GLOBAL_BATCH)] for i in range(GA)]
            n = sum(int((row["labels"][1:] != -100).sum()) for micro in rows for row in micro)
            for micro in rows:
                mine = micro[rank * per_rank:(rank + 1) * per_rank]
                batch = {k: torch.stack([row[k] for row in mine]) for k in mine[0]}
                (model(**batch, num_items_in_batch=n).loss * world).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for name, p in model.named_parameters()}
    return params, [str(w.message) for w in caught if "fused task loss is off" in str(w.message)]


def main(out: str) -> None:
    enable_fsdp_on_cpu()
    for case in CASES:
        params, fused = run(out, case, int(os.environ["WORLD_SIZE"]))
        if int(os.environ["RANK"]) == 0:
            torch.save(params, os.path.join(out, f"{case}.pt"))
            with open(os.path.join(out, f"{case}.fused"), "w") as f:
                f.write(str(fused))
    import torch.distributed as dist  # noqa: PLC0415

    params, notices = head_resharded(dist.get_world_size(), dist.get_rank())
    if dist.get_rank() == 0:
        torch.save(params, os.path.join(out, "head_resharded.pt"))
        with open(os.path.join(out, "head_resharded.notice"), "w") as f:
            f.write("\n".join(notices))
    exit_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1])
