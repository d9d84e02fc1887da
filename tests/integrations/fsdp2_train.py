"""FSDP2 (fully_shard per decoder layer + root) on 2 CPU processes over gloo, launched by test_distributed.py.

For mode='stored', 'activation_free' and 'eager' (with and without checkpointing) and 'auto' (activation-free for
this full fine-tune): one step's gradients (gathered) equal one process on the same global batch
-> OUT/fsdp2_<mode>_ok (fsdp2_eager_train.py runs eager over several accumulated steps, LoRA, mixed precision).
Also Jamba with LoRA (router logits from its MoE layers only, router loss on), eager and stored: one step's gradients
equal one process -> OUT/jamba_lora_<mode>_ok."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import lopt_kernels  # noqa: E402
from helpers import exit_distributed_worker  # noqa: E402
from tiny_models import batch, tiny_model  # noqa: E402


def sharded(mode, mesh):
    model = lopt_kernels.patch(tiny_model("llama"), mode=mode)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def jamba_lora(mode, mesh=None):
    """Jamba with LoRA on every linear layer (the bottom block's routers too), so that no block input needs a
    gradient: which router logits come from the bottom block is known only from their graph."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model = get_peft_model(tiny_model("jamba"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights=False))
    lopt_kernels.patch(model, mode=mode)
    if mesh is not None:
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    b = batch(batch_size=2 * world, seq=9, pad_lengths=(0,))
    b["labels"] = b["input_ids"].clone()  # equal label counts per rank (the aux weighting is per micro-batch)
    n = (b["labels"][:, 1:] != -100).sum()
    local = {k: v[2 * rank: 2 * rank + 2] for k, v in b.items()}

    ref = lopt_kernels.patch(tiny_model("llama"), mode="stored")
    ref(**b, num_items_in_batch=n).loss.backward()
    for mode, ckpt in (("stored", False), ("activation_free", False), ("activation_free", True), ("eager", False),
                       ("eager", True), ("auto", False)):
        model = sharded(mode, mesh)
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        (model(**local, num_items_in_batch=n).loss * world).backward()  # as the Trainer does with num_items
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            for name, p in ref.named_parameters():
                err = (grads[name] - p.grad).abs().max().item()
                assert err <= 1e-5 * p.grad.abs().max().item() + 1e-10, f"{mode}: {name}: {err:.3e}"
            assert grads["model.layers.0.mlp.down_proj.weight"].abs().max() > 0
            open(os.path.join(out, f"fsdp2_{mode}{'_ckpt' if ckpt else ''}_ok"), "w").close()
    # Every rank the same rows (the router load-balancing loss is per process: one process on the same rows is then
    # what FSDP2's average equals), no `* world` (that would scale the router loss too): the label count is the
    # rank's own. The bottom block's router logits are detached for the task loss (stop-grad); under FSDP2 the graph
    # holds the layers' unsharded parameters, not the sharded ones the module lists, and they were missed: eager's
    # caller backward met the block's freed graph (RuntimeError), stored trained the bottom LoRA weights on the
    # router loss.
    local = {k: v[:2] for k, v in b.items()}
    n_local = (local["labels"][:, 1:] != -100).sum()
    ref = jamba_lora("stored")
    ref(**local, num_items_in_batch=n_local).loss.backward()
    for mode in ("stored", "eager"):
        model = jamba_lora(mode, mesh)
        model(**local, num_items_in_batch=n_local).loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
        if rank == 0:
            assert grads.keys() == {name for name, p in ref.named_parameters() if p.grad is not None}, mode
            for name, p in ref.named_parameters():
                if p.grad is not None:
                    err = (grads[name] - p.grad).abs().max().item()
                    scale = p.grad.abs().max().item()
                    assert err <= 1e-5 * scale + 1e-10, f"jamba lora {mode}: {name}: {err:.3e} of {scale:.3e}"
            open(os.path.join(out, f"jamba_lora_{mode}_ok"), "w").close()
    exit_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1])
