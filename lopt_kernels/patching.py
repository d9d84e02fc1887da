"""``patch(model)``: the public API that turns a Hugging Face causal LM into a LoPT model.

Everything is generic: the layer stack is found by structure (``discovery``), and all behaviour comes
from forward hooks on that stack, its owner (the backbone; ``block_hooks``) and the causal LM
(``task_loss_hooks``), so no model family's forward is copied and the state_dict of the original
modules is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from . import block_hooks, optimizer_watch, task_loss_hooks
from .aux_decoder import AuxDecoder
from .boundary.common import gathered
from .discovery import AUX_DECODERS_ATTR, LoptPatchError, text_config, unwrap_causal_lm, validate
from .hf_model import children_around_layers
from .state import PatchState, StateHook

_STATE_ATTR = "_lopt_state"


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def state_of(model: nn.Module) -> PatchState | None:
    return getattr(unwrap_causal_lm(model), _STATE_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch`` has been applied to ``model`` (or to the causal LM it wraps)."""
    return state_of(model) is not None


def _untie_embeddings(lm) -> bool:
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    if out.weight is not inp.weight:
        return False
    tied = inp.weight
    # a PEFT-adapted head (LoRA on lm_head) exposes its base layer's weight as a property: untie that layer's
    head = out.get_base_layer() if hasattr(out, "get_base_layer") else out
    # a model built under deepspeed.zero.Init holds only this rank's partition of the weight (an empty tensor):
    # copy it whole; the new head is an ordinary parameter that the DeepSpeed engine partitions when it wraps the
    # model, as it does the aux decoders
    with gathered([tied]):
        head.weight = nn.Parameter(tied.detach().clone(), requires_grad=tied.requires_grad)
    configs = {id(c): c for c in (lm.config, text_config(lm))}
    for cfg in configs.values():
        cfg.tie_word_embeddings = False
    if hasattr(lm, "get_expanded_tied_weights_keys"):
        lm.all_tied_weights_keys = lm.get_expanded_tied_weights_keys(all_submodels=True)
    return True


def _first_param(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        if p.is_floating_point():
            return p
    raise LoptPatchError(f"{type(module).__name__} has no floating-point parameters to place its aux decoder by")


def patch(
    model: nn.Module,
    *,
    num_blocks: int | None = None,
    boundaries=None,
    lambda_aux: float = 10.0,
    mode: str = "auto",
    backend: str = "auto",
    aux_mask: str = "all",
    fused_ce: str = "auto",
) -> nn.Module:
    """Turn a Hugging Face causal LM into a LoPT model, in place, and return it.

    ``num_blocks`` (default 2, the midpoint) splits the layers into contiguous blocks; ``boundaries``
    gives the first layer index of each block after the first instead. ``lambda_aux`` weights the
    reconstruction loss. ``mode`` picks how the non-final blocks learn (same gradients in every mode):
    ``"eager"`` runs each block's local backward as soon as its forward ends (end-to-end compute, holds
    the block's trainable-parameter gradients until the caller's backward), ``"activation_free"`` keeps
    only each block's input and rebuilds it in the caller's backward (least memory, one more forward of
    the bottom half), ``"stored"`` keeps every activation (the reference's behaviour); ``"auto"`` is eager
    when the held gradients are no larger than the bottom blocks' activations (LoRA), activation-free
    otherwise (full fine-tuning, FSDP2). ``backend`` selects the fused-loss kernels (``"auto"``: Triton on
    CUDA tensors, chunked PyTorch elsewhere). ``aux_mask="tokens"`` leaves padding positions out of
    the aux loss (``"all"``, the reference, counts them). ``fused_ce`` computes the task loss in
    training without materialising logits (``"auto"``: Liger on CUDA, the library's chunked PyTorch
    loop elsewhere; ``"torch"``: torch's ``linear_cross_entropy``; ``"off"``: the model's own loss, logits returned).
    """
    lm, backbone, layers, settings = validate(
        model, num_blocks, boundaries, lambda_aux, mode, backend, aux_mask, fused_ce
    )
    existing = getattr(lm, _STATE_ATTR, None)
    if existing is not None:
        if existing.settings == settings:
            return model
        raise LoptPatchError(
            f"model is already patched with {existing.settings}; requested {settings}. "
            "Call lopt_kernels.unpatch(model) first to change the settings."
        )
    _refuse_sharded(lm)
    untied = _untie_embeddings(lm)
    hidden = text_config(lm).hidden_size
    decoders = nn.ModuleList()
    starts = (0, *settings.boundaries, len(layers))
    for b in range(len(settings.boundaries)):
        ref = _first_param(layers[starts[b + 1] - 1])
        decoders.append(AuxDecoder(hidden, device=ref.device, dtype=ref.dtype))
    lm.add_module(AUX_DECODERS_ATTR, decoders)
    ignore = tuple(f"{AUX_DECODERS_ATTR}.{name}" for name, _ in decoders.named_parameters())
    if getattr(lm, "_keys_to_ignore_on_save", None) is None:
        lm._keys_to_ignore_on_save = set()
    lm._keys_to_ignore_on_save = set(lm._keys_to_ignore_on_save) | set(ignore)

    state = PatchState(settings, lm, backbone, layers, decoders, untied, ignore)
    handles = state.handles
    handles.append(backbone.register_forward_pre_hook(StateHook(block_hooks.backbone_pre_hook, state),
                                                      with_kwargs=True))
    handles.append(backbone.register_forward_hook(StateHook(block_hooks.backbone_post_hook, state), with_kwargs=True,
                                                  always_call=True))
    for b in range(len(settings.boundaries)):
        block = range(starts[b], starts[b + 1])
        for i in block:
            pre = StateHook(block_hooks.layer_pre_hook, state, b, i == block.start)
            post = StateHook(block_hooks.layer_post_hook, state, b) if i == block.stop - 1 else None
            hooks = [("pre", pre)] + ([("post", post)] if post is not None else [])
            hooks.append(("post", StateHook(block_hooks.side_output_hook, state)))
            state.layer_hooks[layers[i]] = (pre, post)
            state.layer_registrations[i] = block_hooks.register_layer_hooks(state, layers[i], hooks)
    # the final block's first layer: refuse inputs computed by the earlier blocks besides the hidden states
    final = starts[-2]
    state.layer_registrations[final] = block_hooks.register_layer_hooks(
        state, layers[final], [("pre", StateHook(block_hooks.final_block_pre_hook, state))])
    task_loss_hooks.follow_embeddings(state)  # the input embeddings' and output head's hooks, moved if replaced
    handles.append(lm.register_forward_pre_hook(StateHook(task_loss_hooks.causal_lm_pre_hook, state), with_kwargs=True))
    handles.append(lm.register_forward_hook(StateHook(task_loss_hooks.causal_lm_post_hook, state), with_kwargs=True,
                                            always_call=True))
    setattr(lm, _STATE_ATTR, state)
    optimizer_watch.watch(state)
    return model


SHARDED_BEFORE_PATCH_MESSAGE = (
    "lopt_kernels.patch: this model is already sharded by {what}: the aux decoders patch adds would be neither "
    "sharded nor reduced across ranks, so each rank would train its own. Patch the model before sharding it "
    "(before fully_shard, accelerator.prepare or trainer.train(); lopt_kernels.attach(trainer) after patch)."
)


def _refuse_sharded(lm: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a torch without FSDP
        return
    for module in lm.modules():
        if isinstance(module, FSDPModule):
            raise LoptPatchError(SHARDED_BEFORE_PATCH_MESSAGE.format(what="FSDP2 (fully_shard)"))
        if isinstance(module, FullyShardedDataParallel):
            raise LoptPatchError(SHARDED_BEFORE_PATCH_MESSAGE.format(what="FSDP (FullyShardedDataParallel)"))


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the hooks and aux decoders ``patch`` added; untied embeddings stay untied."""
    state = state_of(model)
    if state is None:
        raise LoptPatchError(f"{type(model).__name__} is not patched by lopt_kernels; nothing to unpatch")
    lm = state.causal_lm
    for handle in state.handles:
        handle.remove()
    if AUX_DECODERS_ATTR in lm._modules:
        del lm._modules[AUX_DECODERS_ATTR]
    lm._keys_to_ignore_on_save = set(lm._keys_to_ignore_on_save) - set(state.ignore_on_save)
    delattr(lm, _STATE_ATTR)
    return model


def require_state(model) -> PatchState:
    state = state_of(model)
    if state is None:
        raise LoptPatchError(f"{type(model).__name__} is not patched: call lopt_kernels.patch(model) first")
    return state


def aux_decoders(model: nn.Module) -> list[AuxDecoder]:
    """The aux decoders in block order (one per non-final block)."""
    return list(require_state(model).decoders)


def top_and_bottom_params(state: PatchState) -> tuple[set[int], set[int]]:
    """Parameter ids trained by the task loss (final block, final norm, head) and by the local loss."""
    layers, backbone = state.layers, state.backbone
    bottom: set[int] = set()
    for layer in layers[: state.block_starts[-1]]:
        bottom.update(id(p) for p in layer.parameters())
    bottom.update(id(p) for p in state.decoders.parameters())
    # Backbone modules that run before the layer stack (embeddings, OPT's project_in) feed block 0. Which side a
    # module is on comes from the backbone's forward where it says so (OPT registers its final norm and project_out,
    # applied after the layers, before its layer stack); otherwise from the registration order.
    children = list(backbone.named_children())
    layers_name = state.layers_name
    before, after = children_around_layers(type(backbone), layers_name) if layers_name else ((), ())
    registered_before = True
    for name, child in children:
        if child is layers:
            registered_before = False
            continue
        if name in before or (registered_before and name not in after):
            bottom.update(id(p) for p in child.parameters())
    bottom.update(id(p) for p in state.causal_lm.get_input_embeddings().parameters())
    top = {id(p) for p in state.causal_lm.parameters()} - bottom
    return top, bottom


def _outside_causal_lm(model: nn.Module, state: PatchState) -> tuple[set[int], set[int]]:
    """Parameter ids of ``model`` outside the causal LM (a PEFT prompt encoder), as (top, bottom): virtual tokens
    prepended to the input embeddings (prompt tuning, P-tuning) feed block 0 like the embeddings do; anything else
    (prefix tuning's key/value prefix, read by every layer) counts as top, so that no parameter is left out."""
    inside = {id(p) for p in state.causal_lm.parameters()}
    outside = {id(p) for p in model.parameters()} - inside
    bottom: set[int] = set()
    encoders = getattr(model, "prompt_encoder", None)
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        peft_type = str(getattr(config, "peft_type", ""))
        if getattr(config, "is_prompt_learning", False) and "PREFIX" not in peft_type.upper() and encoders is not None \
                and name in encoders:
            bottom.update(id(p) for p in encoders[name].parameters())
    return outside - bottom, bottom & outside


def param_groups(model: nn.Module, lr: float, local_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimiser groups: the final block, final norm and head at ``lr``; the earlier blocks, the
    embeddings and the aux decoders at ``local_lr`` (default ``lr``). Trainable parameters outside the causal LM
    (a PEFT prompt encoder) join the embeddings' group when they are virtual input tokens, the top group otherwise.
    With ``weight_decay > 0``, biases and norm weights (1-D tensors) get no decay, as in the HF Trainer."""
    state = require_state(model)
    top, bottom = top_and_bottom_params(state)
    outside_top, outside_bottom = _outside_causal_lm(model, state)
    top, bottom = top | outside_top, bottom | outside_bottom
    local = lr if local_lr is None else local_lr
    groups = []
    for name, ids, group_lr in (("lopt_top", top, lr), ("lopt_local", bottom, local)):
        params = [p for p in model.parameters() if p.requires_grad and id(p) in ids]
        if weight_decay > 0:
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay})
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0})
        else:
            groups.append({"name": name, "params": params, "lr": group_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
