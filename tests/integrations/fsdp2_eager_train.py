"""mode='eager' under FSDP2 (fully_shard per decoder layer + root), launched by test_distributed.py on N CPU processes
over gloo: 3 optimiser steps of 2 accumulated micro-batches (gradient sync off on the first,
``set_requires_gradient_sync``), token-weighted as HF Trainer does, for full fine-tuning and LoRA, with and without
checkpointing; each variant's parameters (gathered) equal one process without FSDP2 on the same global batches
-> OUT/<variant>_ok. Also: ``mode='auto'`` picks eager under FSDP2 for LoRA (held sharded gradients smaller than the
bottom blocks' activations) -> OUT/auto_lora_eager_ok, a bf16 MixedPrecisionPolicy with fp32 reduction trains
within bf16's rounding of one fp32 process -> OUT/mixed_precision_ok, and LoRA with CPUOffloadPolicy equals one
process -> OUT/cpu_offload_ok; layers not resharded after their forward (full, and LoRA in auto mode) and HSDP
equal one process -> OUT/no_reshard_full_ok, OUT/no_reshard_lora_ok, OUT/hsdp_ok; under HSDP ``auto`` weighs the
held gradients as sharded over the shard group -> OUT/hsdp_auto_sizing_ok."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # noqa: E402

import lopt_kernels  # noqa: E402
from lopt_kernels.block_hooks import (_bottom_layers, _fsdp2_shard_size, held_gradient_bytes,  # noqa: E402
                                      resolve_mode)
from helpers import exit_distributed_worker  # noqa: E402
from tiny_models import batch, tiny_model  # noqa: E402

STEPS, GA, LR = 3, 2, 0.2
VARIANTS = ("full", "full_ckpt", "lora", "lora_ckpt")


def _model(variant, mode):
    model = tiny_model("llama")
    if variant.startswith("lora"):
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    lopt_kernels.patch(model, mode=mode)
    if variant.endswith("ckpt"):
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def windows(world):
    """Per step, GA global micro-batches of 2 * world rows and their label count: padded, of different lengths (so
    the micro-batches' label counts differ), every rank's two rows alike in padding and prompt (equal counts per rank:
    the aux term's token share is per micro-batch and process, as under DDP)."""
    i = 0
    for _ in range(STEPS):
        window = []
        for _ in range(GA):
            b = batch(batch_size=2 * world, seq=9 + i % 3, seed=200 + i, pad_lengths=(0, 2))
            b["labels"][::2, :2] = -100
            window.append(b)
            i += 1
        yield window, sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)


def one_process(variant, world):
    model = _model(variant, "eager")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for window, n in windows(world):
        for b in window:
            model(**b, num_items_in_batch=n).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def sharded(variant, mesh, mode="eager", mp_policy=None, offload=False, reshard=True):
    model = _model(variant, mode)
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, **kwargs)
    return model


def train_sharded(model, rank, world):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for window, n in windows(world):
        for i, b in enumerate(window):
            model.set_requires_gradient_sync(i == len(window) - 1)
            local = {k: v[2 * rank: 2 * rank + 2] for k, v in b.items()}
            (model(**local, num_items_in_batch=n).loss * world).backward()  # as HF Trainer with num_items
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().full_tensor() for name, p in model.named_parameters() if p.requires_grad}


def _compare(got, want, rtol, atol, label):
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for name, p in want.items():
        err = (got[name].float() - p.float()).abs().max().item()
        assert err <= atol + rtol * p.abs().max().item(), f"{label}: {name}: {err:.3e}"


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for variant in VARIANTS:
        got = train_sharded(sharded(variant, mesh), rank, world)
        if rank == 0:
            _compare(got, one_process(variant, world), 1e-5, 1e-7, variant)
            open(os.path.join(out, f"{variant}_ok"), "w").close()
    model = sharded("lora", mesh, mode="auto")
    model(**{k: v[:2] for k, v in batch().items()})
    state = model.get_base_model()._lopt_state
    if rank == 0 and state.current.mode == "eager":
        open(os.path.join(out, "auto_lora_eager_ok"), "w").close()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    got = train_sharded(sharded("full", mesh, mp_policy=policy), rank, world)
    if rank == 0:
        _compare(got, one_process("full", world), 0.0, 2e-2 * LR, "mixed precision")
        open(os.path.join(out, "mixed_precision_ok"), "w").close()
    got = train_sharded(sharded("lora", mesh, offload=True), rank, world)
    if rank == 0:
        _compare(got, one_process("lora", world), 1e-5, 1e-7, "cpu offload")
        open(os.path.join(out, "cpu_offload_ok"), "w").close()
    # layers kept unsharded after their forward: the reduced gradients land on the sharded parameters, not on the
    # module attributes the backward ran with (before: held None, the raw local gradient left in .grad, ~100x off)
    for variant, mode in (("full", "eager"), ("lora", "auto")):
        got = train_sharded(sharded(variant, mesh, mode=mode, reshard=False), rank, world)
        if rank == 0:
            _compare(got, one_process(variant, world), 1e-5, 1e-7, f"no reshard after forward, {variant}")
            open(os.path.join(out, f"no_reshard_{variant}_ok"), "w").close()
    # HSDP (replicas x shards): set_requires_gradient_sync(False) also turns the replicas' all-reduce off, which the
    # block's local backward needs on (before: its gradient was added into the next micro-batch's, mis-weighted)
    hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    got = train_sharded(sharded("full", hsdp), rank, world)
    if rank == 0:
        _compare(got, one_process("full", world), 1e-5, 1e-7, "hsdp")
        open(os.path.join(out, "hsdp_ok"), "w").close()
    # auto weighs the held gradients as sharded over the shard group (2 of 4 ranks here), not over the world: with
    # activations of a third of the unsharded held gradients, half of them (HSDP's shards) are more -> activation-free
    # (before, a quarter -> eager, holding twice what it weighed)
    model = sharded("lora", hsdp, mode="auto")
    state = model.get_base_model()._lopt_state
    state.bottom_fsdp2 = True
    layers = _bottom_layers(state)
    hidden_size = model.config.hidden_size
    positions = held_gradient_bytes(state) // (3 * 4 * hidden_size * len(layers))
    if rank == 0 and _fsdp2_shard_size(layers) == world // 2 \
            and resolve_mode(state, torch.empty(1, positions, hidden_size)) == "activation_free":
        open(os.path.join(out, "hsdp_auto_sizing_ok"), "w").close()
    exit_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1])
