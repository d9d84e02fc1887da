"""Hooks on the layer stack and its owner that insert the LoPT boundaries, for every boundary mode.

A pre-hook on each layer of a non-final block hands the layer call to this forward's boundary mode (a
``boundary.BoundaryMode``, chosen when block 0 starts: it decides how the block runs, with its graph for
``eager``, without one for ``activation_free``), a hook on its last layer hands the block's output to the
mode, which returns the next block's input (gradient stopped) and the block's aux term. The backbone's
hooks reset the per-forward state.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import optimizer_watch
from .boundary import BOUNDARY_MODES
from .boundary.common import BoundaryMode, BoundarySpec, hidden_of, tensors_in, trainable_outside_inputs
from .discovery import LoptPatchError
from .hf_model import HooksOutsideCheckpoint, cache_in, drop_cache, is_kv_cache, non_reentrant_checkpoint
from .state import PatchState, PassState

MISSING_AUX_MESSAGE = (
    "lopt_kernels: a backward reached the LoPT boundary through the task path, but the loss being "
    "backpropagated does not contain the aux term, so the blocks below the boundary get no gradient. "
    "Backpropagate the patched model's out.loss, add lambda_aux * out.lopt_aux_loss to your own loss, or call "
    "lopt_kernels.attach(trainer) for Trainer/TRL trainers that build their own loss."
)


EVAL_MODE_MESSAGE = (
    "lopt_kernels: the patched model ran a forward with gradients enabled in eval() mode, where LoPT is off: "
    "no gradient boundary and no aux loss, so a backward from this output trains the whole model end-to-end. "
    "from_pretrained returns a model in eval mode: call model.train() before training (and run evaluation "
    "under torch.no_grad())."
)

ADAPTED_DECODER_MESSAGE = (
    "lopt_kernels: PEFT injected an adapter into an aux decoder (target_modules matched lopt_aux_decoders, e.g. "
    "'all-linear'): the fused reconstruction loss uses the decoders' own weights, so the adapters would never "
    "train and the decoders would stay at their initialisation. Exclude the decoders from target_modules "
    "(e.g. a list of the model's projection names), or call lopt_kernels.patch after get_peft_model."
)


def _check_decoders(state: PatchState) -> None:
    """Refuse decoders whose projections PEFT replaced by adapter layers (the fused op would bypass them)."""
    for decoder in state.decoders:
        for module in (decoder.down, decoder.up):
            if not isinstance(module, nn.Linear) or hasattr(module, "base_layer"):
                raise LoptPatchError(ADAPTED_DECODER_MESSAGE)


FROZEN_DECODERS_MESSAGE = (
    "lopt_kernels: the aux decoders are frozen (requires_grad=False) while the bottom blocks train, so the bottom "
    "blocks learn against decoders fixed at their initialisation. {what} Call lopt_kernels.ensure_aux_trainable(model) "
    "before building the optimiser (lopt_kernels.attach(trainer) does it for Trainer/TRL), or patch after "
    "get_peft_model."
)


DDP_BEFORE_PATCH_MESSAGE = (
    "lopt_kernels: this model runs under a DistributedDataParallel built before lopt_kernels.patch: DDP's reducer "
    "does not hold the aux decoders patch added, so their gradients are not averaged and each rank would train its "
    "own. Patch the model before wrapping it in DDP (before accelerator.prepare or trainer.train())."
)


def _check_data_parallel_wrapper(state: PatchState) -> None:
    """Refuse a training forward under a DDP wrapper whose reducer was built before ``patch`` (without the aux
    decoders). DDP names the wrapper whose forward is running; its parameter list is read once per wrapper."""
    ddp = torch.nn.parallel.DistributedDataParallel._active_ddp_module
    if ddp is None:
        return
    if state.checked_ddp is None or state.checked_ddp() is not ddp:
        known = {id(p) for p in getattr(ddp, "_module_parameters", ())}
        if known and any(p.requires_grad and id(p) not in known for p in state.decoders.parameters()):
            raise LoptPatchError(DDP_BEFORE_PATCH_MESSAGE)
        state.checked_ddp = weakref.ref(ddp)


def _check_decoders_trainable(state: PatchState) -> None:
    """Frozen decoders while the bottom blocks train: ``get_peft_model`` after ``patch`` freezes them. In one process
    they are then made trainable (what ``ensure_aux_trainable`` does; an optimiser built without them is caught at its
    first step, see optimizer_watch); under a data-parallel wrapper, whose reducer was built without them, this
    raises; decoders frozen without PEFT (perhaps on purpose) get a warning."""
    if any(p.requires_grad for p in state.decoders.parameters()):
        return
    bottom = _bottom_layers(state)
    if not any(p.requires_grad for layer in bottom for p in layer.parameters()):
        return
    peft = any(hasattr(m, "base_layer") for layer in bottom for m in layer.modules())
    if peft and not distributed():
        for p in state.decoders.parameters():
            p.requires_grad_(True)
        state.notice_once("frozen_decoders", FROZEN_DECODERS_MESSAGE.format(
            what="PEFT froze them (get_peft_model after patch): lopt_kernels made them trainable; an optimiser "
                 "built before this, or from a requires_grad filter, does not hold them."))
    elif peft:
        raise LoptPatchError(FROZEN_DECODERS_MESSAGE.format(
            what="PEFT froze them (get_peft_model after patch), and the data-parallel wrapper was built without "
                 "them, so they cannot be made trainable now."))
    else:
        state.notice_once("frozen_decoders", FROZEN_DECODERS_MESSAGE.format(
            what="If that is on purpose, ignore this warning."))


def _run_block_ends_last(state: PatchState) -> None:
    """Move the hook on each non-final block's last layer behind every other forward hook of that layer, so that it
    gets the layer's output as the other hooks leave it. Sharding wrappers applied after ``patch`` hook the output
    for its backward: FSDP2's post-forward hook (unshard, reduce-scatter) and DeepSpeed ZeRO-3's (a Function that
    gathers the layer's own parameters when its backward starts, and that the coordinator must see before the hook
    on the layer's inputs releases them after it). The eager local backward then starts from such an output, as any
    backward does; run before them, its backward released a layer ZeRO-3 had never fetched for it
    (``AssertionError: active_backward_submodules is empty during backward pass`` on GPT-2, whose attention leaves no
    submodule active to mask it). Checked on every training forward: the wrappers may arrive after the first one."""
    for layer, (_, post) in state.layer_hooks.items():
        if post is None:
            continue
        hooks = layer._forward_hooks
        if hooks and next(reversed(hooks.values())) is not post:
            for key, fn in list(hooks.items()):
                if fn is post:
                    hooks.move_to_end(key)


def register_layer_hooks(state: PatchState, module: nn.Module, hooks: list) -> tuple:
    """Register ``hooks`` (``(kind, hook)``, kind ``"pre"`` or ``"post"``, both with kwargs) on ``module``; returns the
    registration ``follow_layers`` moves."""
    entries = []
    for kind, hook in hooks:
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handle = register(hook, with_kwargs=True)
        state.handles.append(handle)
        entries.append((kind, hook, handle))
    return module, entries


def follow_layers(state: PatchState) -> None:
    """Keep our layer hooks on the module the layer list holds now. Wrapping a layer in place after ``patch``
    (accelerate's and torchtitan's activation checkpointing under FSDP2, ``checkpoint_wrapper``, a compiled layer)
    leaves our hooks on the inner module, inside the wrapper: inside its checkpoint, where they would run again in
    the recompute, and under the wrapper's sharding hooks, which the activation-free rebuild must call through.
    Checked on every training forward (a few identity tests)."""
    for i, (module, entries) in list(state.layer_registrations.items()):
        current = state.layers[i]
        if current is module:
            continue
        moved = []
        for kind, hook, handle in entries:
            handle.remove()
            state.handles.remove(handle)
            moved.append((kind, hook))
        state.layer_registrations[i] = register_layer_hooks(state, current, moved)
        if module in state.layer_hooks:
            state.layer_hooks[current] = state.layer_hooks.pop(module)


def _fsdp2_sharded(layers) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for layer in layers for m in layer.modules())


def _fsdp2_shard_size(layers) -> int:
    """How many ranks FSDP2 shards the layers' parameters over: the shard dimension of their mesh (under HSDP, not the
    replicas'), the world size where that cannot be read."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    for module in (m for layer in layers for m in layer.modules() if isinstance(m, FSDPModule)):
        try:
            return module._get_fsdp_state()._fsdp_param_groups[0].mesh_info.shard_mesh_size
        except (AttributeError, IndexError):  # another torch's layout, or a module without parameters of its own
            continue
    return torch.distributed.get_world_size()


def _bottom_layers(state: PatchState):
    return state.layers[: state.block_starts[-1]]


def held_gradient_bytes(state: PatchState) -> int:
    """What eager mode holds from the bottom blocks' forward to the caller's backward: a gradient for
    every trainable parameter of the non-final blocks and their aux decoders."""
    params = {id(p): p for layer in _bottom_layers(state) for p in layer.parameters() if p.requires_grad}
    params.update((id(p), p) for p in state.decoders.parameters() if p.requires_grad)
    # ds_numel: the whole parameter's size where DeepSpeed ZeRO-3 keeps only a partition (numel 0) on this rank
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params.values())


def zero3_leaf_modules_trained(state: PatchState) -> list[str]:
    """Class names of the DeepSpeed ZeRO-3 leaf modules with trainable parameters in the non-final blocks. DeepSpeed
    flags transformers' mixture-of-experts blocks (MixtralSparseMoeBlock, Qwen2/3-MoE's) as leaf modules: it
    gathers their parameters whole and reduces their gradients from a backward hook on the module, not from each
    parameter's gradient accumulation."""
    names = set()
    for layer in _bottom_layers(state):
        for module in layer.modules():
            if getattr(module, "_z3_leaf", False) and any(p.requires_grad and hasattr(p, "ds_id")
                                                          for p in module.parameters()):
                names.add(type(module).__name__)
    return sorted(names)


ZERO3_LEAF_EAGER_MESSAGE = (
    "mode='eager' cannot train this model under DeepSpeed ZeRO-3: its bottom blocks hold ZeRO-3 leaf modules with "
    "trainable parameters ({names}; DeepSpeed flags mixture-of-experts blocks so), whose gradients DeepSpeed reduces "
    "from a backward hook on the module. Eager's local backward runs inside the forward, before the caller's loss "
    "has weighted the aux term, so that hook would reduce them there (and DeepSpeed's hook fails inside it). Patch "
    "with mode='activation_free' (or 'stored', or 'auto', which picks activation-free here), or freeze the leaf "
    "modules' parameters (LoRA on the attention projections trains in eager)."
)


def resolve_mode(state: PatchState, hidden: torch.Tensor, outside_inputs=()) -> str:
    """The boundary mode of this training forward. ``auto``: eager (no recomputation) when the gradients it
    would hold are no larger than the bottom blocks' layer-boundary activations (LoRA, partly frozen models;
    under FSDP2 the held gradients are sharded: 1/(shard group size) of that, the world under FSDP, a replica's
    shard group under HSDP), activation-free otherwise (a full fine-tune, where holding half the model's
    gradients through the top half's work costs more memory than recomputing the bottom half costs time).
    ``outside_inputs``: trainable tensors the first bottom layer reads besides its hidden states (per-layer
    inputs), which the activation-free rebuild cannot differentiate: ``auto`` is then eager
    (stored under FSDP2, whose eager backward would accumulate them unscaled). Under DeepSpeed ZeRO-3, trainable
    leaf modules in the bottom blocks (MoE blocks) rule eager out (see ``zero3_leaf_modules_trained``): ``auto``
    is then activation-free (stored where outside inputs also rule that out)."""
    mode = state.settings.mode
    zero3 = mode in ("auto", "eager") and any(hasattr(p, "ds_id") for p in state.decoders.parameters())
    leaves = zero3_leaf_modules_trained(state) if zero3 else []
    if leaves and mode == "eager":
        raise LoptPatchError(ZERO3_LEAF_EAGER_MESSAGE.format(names=", ".join(leaves)))
    refused = ("activation_free", "eager") if state.bottom_fsdp2 else ("activation_free",)
    if outside_inputs and (mode in refused or (mode == "auto" and state.bottom_fsdp2)):
        fix = "mode='stored'" if state.bottom_fsdp2 else "mode='eager' or mode='stored'"
        raise LoptPatchError(
            f"mode={mode!r} cannot train this model{' under FSDP2' if state.bottom_fsdp2 else ''}: its bottom layers "
            f"read {len(outside_inputs)} trainable tensor(s) besides their hidden states (per-layer inputs such as "
            "Gemma3n's per_layer_inputs, a trainable prefix in the KV cache), whose aux-loss gradient that mode would "
            f"leave out. Patch with {fix}, or freeze what produces them."
        )
    if mode != "auto":
        return mode
    if leaves:
        return "stored" if outside_inputs else "activation_free"
    if outside_inputs:
        return "eager"
    activations = hidden.numel() * hidden.element_size() * len(_bottom_layers(state))
    held = held_gradient_bytes(state)
    if state.bottom_fsdp2 and distributed():  # FSDP2 holds them sharded (over the shard group, under HSDP)
        held /= _fsdp2_shard_size(_bottom_layers(state))
    return "eager" if held <= activations else "activation_free"


def _use_non_reentrant_checkpointing(state: PatchState) -> None:
    """Eager mode's local backward is a ``torch.autograd.grad``, which reentrant checkpointing refuses: for
    this forward, the bottom layers checkpoint non-reentrantly (same recomputation, same values)."""
    for layer in _bottom_layers(state):
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        func = layer.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, HooksOutsideCheckpoint):
            replacement = non_reentrant_checkpoint(func.inner)
            if replacement is not None:
                func.inner = replacement
            continue
        replacement = non_reentrant_checkpoint(func) if func is not None else None
        if replacement is not None:
            state.saved_checkpoint_funcs.setdefault(layer, func)
            layer._gradient_checkpointing_func = replacement


def _hoist_hooks_out_of_checkpoint(state: PatchState) -> None:
    """For this forward, every checkpointing bottom layer's checkpoint function becomes a HooksOutsideCheckpoint
    (put back by the backbone's post-hook, with the eager swap above; gradient_checkpointing_enable may replace
    the function at any time, so it is wrapped anew each forward)."""
    for layer in _bottom_layers(state):
        func = layer.__dict__.get("_gradient_checkpointing_func")
        if not getattr(layer, "gradient_checkpointing", False) or func is None or isinstance(func, HooksOutsideCheckpoint):
            continue
        state.saved_checkpoint_funcs.setdefault(layer, func)
        pre, post = state.layer_hooks[layer]
        layer._gradient_checkpointing_func = HooksOutsideCheckpoint(layer, func, pre, post, state.checkpoint_bodies)


def _restore_checkpointing(state: PatchState) -> None:
    for layer, func in state.saved_checkpoint_funcs.items():
        layer._gradient_checkpointing_func = func
    state.saved_checkpoint_funcs.clear()


def input_embeddings_hook(state: PatchState):
    """Records (weakly) the input embeddings' output of a training forward: where a hook made that output a
    leaf that requires grad only to keep checkpointing working, eager mode need not hold its gradient."""

    def hook(module, args, output):
        run = state.current
        if run.active and torch.is_tensor(output):
            run.embedding_output = weakref.ref(output)
        return None

    return hook


def backbone_pre_hook(state: PatchState):
    def hook(module, args, kwargs):
        if state.replaying:
            return None
        grad = torch.is_grad_enabled()
        if grad and not module.training:
            state.notice_once("eval_mode", EVAL_MODE_MESSAGE)
        run = PassState(active=module.training and grad)
        if run.active:
            follow_layers(state)
            _check_data_parallel_wrapper(state)
            _check_decoders(state)
            _check_decoders_trainable(state)
            optimizer_watch.check_before_forward(state)
            # A KV cache the caller asked for is honoured by every layer; one the model builds by itself
            # (config.use_cache) is not kept by activation-free blocks, and then not returned (see the post-hook).
            run.cache_requested = bool(kwargs.get("use_cache")) or cache_in(args, kwargs) is not None
            if state.bottom_fsdp2 is None:  # once: sharding happens before training starts
                state.bottom_fsdp2 = _fsdp2_sharded(_bottom_layers(state))
            _run_block_ends_last(state)
            final_layers = state.layers[state.block_starts[-1] :]
            run.layerwise_rebuild = any(getattr(layer, "gradient_checkpointing", False) for layer in final_layers)
            _hoist_hooks_out_of_checkpoint(state)
            if state.settings.aux_mask == "tokens":
                run.row_mask = _row_mask(state, kwargs.get("attention_mask"))
        state.current = run
        return None

    return hook


def _row_mask(state: PatchState, attention_mask) -> torch.Tensor | None:
    """The non-padding positions as a flat bool mask (the fused op's ``row_mask``), or None without a mask."""
    if attention_mask is None:
        return None  # no padding (e.g. a padding-free packed batch)
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        state.notice_once(
            "aux_mask",
            "lopt_kernels: aux_mask='tokens' needs a 2-D attention_mask (batch, seq) to find padding; got "
            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}. The aux loss counts every position.",
        )
        return None
    # No host sync and no gather: the kernels skip the excluded rows and count the rest on the device.
    return attention_mask.reshape(-1) != 0


def backbone_post_hook(state: PatchState):
    def hook(module, args, kwargs, output):
        run = state.current
        if run.boundary is not None:  # grad mode back if an exception escaped a block; this forward's tensors let go
            run.boundary.end_forward()
        _restore_checkpointing(state)
        if run.active and output is not None and not state.replaying:
            check_every_block_ran(state, run)
        if run.active:
            # eager blocks' held gradients enter the graph in the causal LM's post-hook, after the task loss
            # (see boundary/eager.py), so that the caller's backward hands them over first
            output = _without_bottom_router_gradients(state, output)
            output = _bottom_records_cut(state, output, run.replaced_inputs)
        run.replaced_inputs, run.first_inputs, run.side_outputs, run.hand_off_nodes = {}, {}, {}, []
        run.block_inputs, run.cut_outputs = [], {}
        if run.cache_skipped:
            return drop_cache(output)
        return output

    return hook


def _without_bottom_router_gradients(state: PatchState, output):
    """MoE backbones return their layers' router logits (for the router load-balancing loss, added to the task
    loss): the non-final blocks' entries are detached, so the task loss never reaches the bottom blocks (stop-grad),
    and eager mode's already-freed block graphs are never backpropagated twice. One entry per layer: by position;
    otherwise (dense layers between MoE ones, as Jamba's or DeepSeek's first layers; several routers per layer) the
    entries whose autograd graph reaches a non-final block's parameters (activation-free blocks make none with one)."""
    logits = output.get("router_logits") if hasattr(output, "get") else None
    if not isinstance(logits, tuple) or not logits:
        return output
    bottom = state.block_starts[-1]
    if len(logits) == len(state.layers):
        output["router_logits"] = tuple(t.detach() if i < bottom and torch.is_tensor(t) else t
                                        for i, t in enumerate(logits))
        return output
    # Or a non-final block's input (the embeddings' output, a PEFT prompt, eager's leaf): the bottom layers'
    # parameters may all be frozen (embedding-only or prompt tuning), and the router loss would then train what feeds
    # block 0 (stored) or backpropagate into eager's freed block graph. The final block reaches those inputs only
    # through the hand-offs, where the walk stops.
    run = state.current
    leaves = [ref() for ref in run.block_inputs if isinstance(ref, weakref.ref)]
    nodes = [node for node in run.block_inputs if not isinstance(node, weakref.ref) and node not in run.hand_off_nodes]
    reaches = _reachability(_graph_parameter_ids(state.layers[:bottom]) | {id(t) for t in leaves if t is not None},
                            stop=run.hand_off_nodes, targets=nodes)
    output["router_logits"] = tuple(t.detach() if torch.is_tensor(t) and t.grad_fn is not None and reaches(t.grad_fn)
                                    else t for t in logits)
    return output


def _graph_parameter_ids(layers) -> set[int]:
    """The ids of the parameter tensors a forward of ``layers`` puts in the autograd graph: the ones the modules list
    and, under FSDP2, the unsharded parameters its forward ran with (the modules list the sharded ones again once
    resharded after their forward; the graph's leaves are the unsharded ones)."""
    ids = set()
    for layer in layers:
        for module in layer.modules():
            ids.update(id(p) for p in module.parameters(recurse=False))
            get_state = getattr(module, "_get_fsdp_state", None)  # an FSDPModule (torch 2.13's layout)
            groups = getattr(get_state(), "_fsdp_param_groups", ()) if get_state is not None else ()
            for fsdp_param in (fp for group in groups for fp in group.fsdp_params):
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    ids.add(id(unsharded))
    return ids


def _reachability(param_ids: set, stop=(), targets=()):
    """``reaches(node)``: whether an autograd node's graph reaches one of the leaf tensors ``param_ids`` (by id) or
    one of the nodes ``targets`` other than through the nodes ``stop`` (the block boundaries' hand-offs, whose backward
    sends nothing down: in stored and activation-free mode they take the block's parameters as inputs). Memoised
    across calls, so that several tensors of one graph cost one walk of it."""
    memo: dict = dict.fromkeys(targets, True)
    memo.update(dict.fromkeys(stop, False))

    def reaches(root) -> bool:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            variable = getattr(node, "variable", None)
            if variable is not None:
                memo[node] = id(variable) in param_ids
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            if expanded:
                memo[node] = any(memo.get(child, False) for child in children)
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in children if child not in memo)
        return memo[root]

    return reaches


BOTTOM_RECORD_MESSAGE = (
    "lopt_kernels: a backward reached a hidden state or attention map recorded inside a non-final block "
    "(output_hidden_states / output_attentions): LoPT trains those blocks by the aux loss alone, so in every mode "
    "that term's gradient stops there and does not reach the bottom blocks. To train a block on such a term, train "
    "the model unpatched (end to end)."
)


class _CutBottomRecord(torch.autograd.Function):
    """A non-final block's recorded inner hidden state or attention map, as returned to the caller: its value with no
    gradient into the block, one behaviour in every mode (eager has already freed the block's graph, activation-free
    never built one, stored would otherwise train the block on it), and a warning when a backward reaches it.
    ``anchor`` (an empty tensor requiring grad) gives the output a grad_fn in every mode."""

    @staticmethod
    def forward(ctx, value, anchor, notice):
        ctx.notice = notice
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.notice()
        return None, None, None


def _bottom_records_cut(state: PatchState, output, replaced_inputs: dict):
    """The backbone output with its non-final blocks' recorded hidden states (layer outputs: entries 1 .. first
    final-block layer of ``hidden_states``, whose entry 0 is the embeddings' output, block 0's input) and attention
    maps (entries 0 .. first final-block layer - 1 of ``attentions``) cut by ``_CutBottomRecord``. An eager block 0
    ran on a detached leaf, which may have been recorded as entry 0: the input it replaced is returned instead, so
    that a loss on it trains the embeddings as in the other modes."""
    if not hasattr(output, "get"):
        return output
    n, last_bottom = len(state.layers), state.block_starts[-1]
    anchor, notice = None, lambda: state.notice_once("bottom_record", BOTTOM_RECORD_MESSAGE)
    for key, size, bottom in (("hidden_states", n + 1, range(1, last_bottom + 1)), ("attentions", n, range(last_bottom))):
        records = output.get(key)
        if not isinstance(records, tuple) or len(records) != size:
            continue
        if anchor is None:
            anchor = torch.empty(0, requires_grad=True)
        output[key] = tuple(
            _CutBottomRecord.apply(t.detach(), anchor, notice) if i in bottom and torch.is_tensor(t)
            else replaced_inputs.get(id(t), t) if key == "hidden_states" and i == 0 else t
            for i, t in enumerate(records))
    return output


REPEATED_LAYER_MESSAGE = (
    "lopt_kernels: layer {i} ran twice in one training forward: the model loops over part of its layer stack "
    "(a recurrent-depth or looped model), and layer {i} lies in the non-final {span}. LoPT's boundary hooks sit on "
    "the layer modules of the non-final blocks, so a second call would restart or end a block in the middle of the "
    "forward and train it wrongly. Put every looped layer in the final block (boundaries=[...] whose last entry is "
    "<= {i}{hint}), or train this model unpatched."
)

SKIPPED_LAYER_MESSAGE = (
    "lopt_kernels: in this training forward the model skipped layer(s) {skipped} of the non-final blocks (a layer "
    "it runs only sometimes: Mllama's cross-attention layers without images, LayerDrop), and {what}. LoPT's boundary "
    "is a hook on a block's first and last layer, so a skipped one would leave the block without its aux loss and "
    "let the task loss train it. Choose boundaries whose blocks start and end at layers that always run{hint}."
)

SIDE_INPUT_MESSAGE = (
    "lopt_kernels: mode={mode!r} runs activation-free blocks here, which cannot train this model: layer {i} (in the "
    "non-final {span}) reads besides its hidden states a tensor ({what}, shape {shape}) that an earlier layer of its "
    "block computed and that the activation-free rebuild cannot pass on rebuilt (it does so for a tensor an "
    "earlier layer returns as an element of its output, not for one inside a container or computed otherwise), so "
    "it would be a constant in the rebuild and its share of the aux-loss gradient lost. Patch with mode='eager' or "
    "mode='stored', which backpropagate through it."
)

CROSS_BLOCK_INPUT_MESSAGE = (
    "lopt_kernels: layer {i}, the first of block {block}, reads besides its hidden states a tensor ({what}, shape "
    "{shape}) that the layers of earlier blocks computed, not through the hidden states the block boundary cuts (a "
    "connection across layers, such as Inkling2's block attention residuals). The task loss "
    "would reach the earlier blocks through it (each mode differently), so LoPT cannot train this model with a "
    "boundary at layer {i}; train it unpatched."
)


def _layer_index(state: PatchState, module) -> int:
    return next(i for i, layer in enumerate(state.layers) if layer is module)


def _span(state: PatchState, block: int) -> str:
    r = state.block_range(block)
    return f"block {block} = layers {r.start}-{r.stop - 1}"


def _argument_tensors(rest: tuple, kwargs: dict):
    """The tensors among a layer call's arguments besides its hidden states, KV cache objects left out (what a
    layer reads of another layer's keys and values is check_kv_sharing's)."""
    for value in (*rest, *kwargs.values()):
        if not is_kv_cache(value):
            yield from tensors_in(value)


def foreign_input(state: PatchState, run: PassState, block: int, hidden, rest: tuple, kwargs: dict, *,
                  graph: bool, threaded: bool = False) -> tuple | None:
    """A tensor a layer call reads besides its hidden states that earlier layers of this forward computed, as
    ``(tensor, what)``, or None: one an earlier layer returned besides its hidden states (router states passed on,
    a separate residual stream), a stack of hidden states (batch, positions, ..., hidden, one dimension more than
    the hidden states) that block 0's first layer did not read (Inkling2's earlier blocks' states), both found in
    every mode; with ``graph``, also
    one whose autograd graph reaches the parameters of the layers before ``block``."""
    earlier = None
    lead = hidden.shape[:-1]
    for t in _argument_tensors(rest, kwargs):
        if t is hidden or not t.is_floating_point():
            continue
        base = t if t._base is None else t._base
        if id(t) in run.cut_outputs:
            continue  # a block's last layer's output, its gradient stopped at the boundary as the hidden states'
        if threaded and run.boundary.producer_of(block, t) is not None:
            continue  # the activation-free rebuild hands the rebuilt tensor on (see ActivationFreeMode)
        if id(t) in run.side_outputs or id(base) in run.side_outputs:
            return t, "that an earlier layer returned besides its hidden states"
        if id(t) in run.first_inputs or id(base) in run.first_inputs:
            continue
        # a stack of hidden states (an extra dimension): a tensor of the hidden states' own shape may be one the
        # backbone computed before the layers (a single-head model's rotary table at batch 1), which the graph
        # check below tells apart where there is a graph
        if t.dim() > hidden.dim() and tuple(t.shape[: len(lead)]) == tuple(lead) and t.shape[-1] == hidden.shape[-1]:
            return t, "shaped like a stack of hidden states"
        if graph and t.requires_grad and t.grad_fn is not None:
            if earlier is None:
                earlier = _reachability({id(p) for layer in state.layers[: state.block_starts[block]]
                                         for p in layer.parameters()}, stop=run.hand_off_nodes)
            if earlier(t.grad_fn):
                return t, "whose gradient reaches an earlier block's parameters"
    return None


def check_block_inputs(state: PatchState, run: PassState, block: int, module, hidden, rest: tuple, kwargs: dict):
    """Refuse a block (after the first) whose first layer reads, besides its hidden states, a tensor computed by the
    earlier blocks' layers (``foreign_input``): the boundary cuts the hidden states only."""
    found = foreign_input(state, run, block, hidden, rest, kwargs, graph=True)
    if found is not None:
        t, what = found
        raise LoptPatchError(CROSS_BLOCK_INPUT_MESSAGE.format(i=_layer_index(state, module), block=block,
                                                              shape=tuple(t.shape), what=what))


def check_layer_inputs(state: PatchState, run: PassState, block: int, module, hidden, rest: tuple, kwargs: dict):
    """Inside a non-final block, activation-free mode replays each layer on the arguments it recorded. A tensor an
    earlier layer of the block returned (ZAYA's router states) is passed on from the rebuilt layer instead; one it
    cannot pass on (held in a container, or computed otherwise) would be a constant in the rebuild and its share of
    the aux gradient lost: refused in that mode (eager and stored backpropagate through it)."""
    if run.mode != "activation_free":
        return
    found = foreign_input(state, run, block, hidden, rest, kwargs, graph=False, threaded=True)
    if found is not None:
        t, what = found
        raise LoptPatchError(SIDE_INPUT_MESSAGE.format(i=_layer_index(state, module), span=_span(state, block),
                                                       shape=tuple(t.shape), what=what,
                                                       mode=state.settings.mode))


def side_output_hook(state: PatchState):
    """On every layer of the non-final blocks: records the tensors a layer returns besides its hidden states (held
    until the backbone's forward ends), which a later layer must not read across a boundary (``foreign_input``)."""

    def hook(module, args, kwargs, output):
        run = state.current
        if not run.active or state.replaying or module in state.checkpoint_bodies:
            return None
        if isinstance(output, (tuple, list)):
            for k, value in enumerate(output[1:], start=1):
                if is_kv_cache(value):
                    continue
                for t in tensors_in(value):  # (tensor, the layer, its place in the output if it is one itself)
                    run.side_outputs[id(t)] = (t, module, k if value is t else None)
        return None

    return hook


def final_block_pre_hook(state: PatchState):
    """On the final block's first layer: the cross-block input check (the non-final blocks' starts check in their
    own pre-hook)."""

    def hook(module, args, kwargs):
        run = state.current
        if not run.active or state.replaying or module in state.checkpoint_bodies or run.boundary is None:
            return None
        if torch._C._current_graph_task_id() != -1:  # a checkpoint's recompute in the backward (detached copies)
            return None
        hidden, rest = (args[0], args[1:]) if args else (kwargs.get("hidden_states"), ())
        if torch.is_tensor(hidden):
            check_block_inputs(state, run, len(state.settings.boundaries), module, hidden, rest,
                               {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return None

    return hook


def check_every_block_ran(state: PatchState, run: PassState) -> None:
    """After the backbone's training forward: every non-final block started and ended (a skipped first or last
    layer leaves a block without its boundary)."""
    n = len(state.settings.boundaries)
    if len(run.blocks_ended) == n and not (run.boundary is not None and run.boundary.tapes):
        return
    bottom = state.block_starts[-1]
    skipped = [i for i in range(bottom) if id(state.layers[i]) not in run.layers_run]
    if not skipped and run.boundary is None:
        return  # no layer of the stack ran at all (nothing to train)
    missing = [b for b in range(n) if b not in run.blocks_ended]
    what = "; ".join(f"{_span(state, b)} never {'started' if state.block_starts[b] in skipped else 'ended'}"
                     for b in missing)
    ran = [i for i in range(1, len(state.layers)) if i not in skipped and i - 1 not in skipped]
    mid = len(state.layers) // 2
    hint = f" (e.g. boundaries=[{min(ran, key=lambda i: abs(i - mid))}])" if ran else ""
    raise LoptPatchError(SKIPPED_LAYER_MESSAGE.format(skipped=skipped, what=what or "a block did not end", hint=hint))


def layer_pre_hook(state: PatchState, block: int, is_start: bool):
    def hook(module, args, kwargs):
        run = state.current
        if not run.active or state.replaying or module in state.checkpoint_bodies:
            return None
        if id(module) in run.layers_run:
            i = _layer_index(state, module)
            raise LoptPatchError(REPEATED_LAYER_MESSAGE.format(
                i=i, span=_span(state, block), hint=f", e.g. boundaries=[{i}]" if i >= 1 else ""))
        run.layers_run.add(id(module))
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        if is_start and block == 0:
            for t in _argument_tensors(rest, kwargs):
                base = t if t._base is None else t._base
                run.first_inputs[id(t)], run.first_inputs[id(base)] = t, base
        elif is_start:
            check_block_inputs(state, run, block, module, hidden, rest, kwargs)
        else:
            check_layer_inputs(state, run, block, module, hidden, rest, kwargs)
        if is_start:
            if run.boundary is None:  # block 0: this forward's mode
                run.boundary = _boundary_for(state, run, hidden, rest, kwargs)
            # the modules the layer list holds now (a wrapper put in place after patch: see follow_layers)
            run.boundary.begin_block(block, [state.layers[i] for i in state.block_range(block)], hidden, rest, kwargs)
        replaced = run.boundary.before_layer(block, module, hidden, rest, kwargs, is_start)
        if is_start:
            ran_on = replaced[0][0] if replaced is not None and replaced[0] else hidden
            if torch.is_tensor(ran_on) and ran_on.requires_grad:
                run.block_inputs.append(ran_on.grad_fn if ran_on.grad_fn is not None else weakref.ref(ran_on))
        return replaced

    return hook


def _boundary_for(state: PatchState, run: PassState, hidden, rest: tuple, kwargs: dict) -> BoundaryMode:
    """The boundary mode of this training forward, from block 0's first layer call."""
    outside = trainable_outside_inputs(rest, kwargs, run.embedding_output_now())
    boundary = BOUNDARY_MODES[resolve_mode(state, hidden, outside)](run)
    if boundary.backward_in_forward:
        _use_non_reentrant_checkpointing(state)
    return boundary


def layer_post_hook(state: PatchState, block: int):
    def hook(module, args, kwargs, output):
        run = state.current
        if not run.active or state.replaying or module in state.checkpoint_bodies:
            return None
        spec = BoundarySpec(
            decoder=state.decoders[block],
            backend=state.settings.backend,
            layerwise_rebuild=run.layerwise_rebuild,
            replay_guard=state,
            row_mask=run.row_mask,
            # FSDP2 reduces gradients from hooks on the unsharded parameters' accumulation, so the
            # rebuild must accumulate; DDP's reducer needs them from the outer backward instead.
            accumulate_into_grad=bool(state.bottom_fsdp2) or not distributed(),
            sharded_grads=bool(state.bottom_fsdp2),
            on_missing_aux=lambda: state.notice_once("missing_aux", MISSING_AUX_MESSAGE),
        )
        hand_off, aux_term = run.boundary.end_block(block, spec, hidden_of(output))
        run.aux_terms.append(aux_term)
        run.blocks_ended.add(block)
        if hand_off.grad_fn is not None:
            run.hand_off_nodes.append(hand_off.grad_fn)
        if isinstance(output, (tuple, list)):
            # what the layer returns besides its hidden states and the backbone hands to the next block's layers
            # (ZAYA's router states) crosses the boundary with its gradient stopped too
            rest = [t.detach() if torch.is_tensor(t) and t.requires_grad else t for t in output[1:]]
            run.cut_outputs.update((id(t), t) for t in rest if torch.is_tensor(t))
            return (hand_off, *rest) if isinstance(output, tuple) else [hand_off, *rest]
        return hand_off

    return hook


def distributed() -> bool:
    """Whether a process group is up (DDP/FSDP reducers expect gradients from the outer backward)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()

