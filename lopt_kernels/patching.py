"""``patch(model)``: hooks on a Hugging Face causal LM's layer stack that insert the LoPT boundaries.

Everything here is generic: the layer stack is found by structure (the ``nn.ModuleList`` holding
``config.num_hidden_layers`` layers of one class), and all behaviour comes from forward hooks on
that stack, its owner (the backbone) and the causal LM, so no model family's forward is copied
and the state_dict of the original modules is untouched.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ._outputs import with_lopt_fields
from .aux_decoder import AuxDecoder
from .boundary import BlockTape, BoundarySpec, LayerCall, apply_boundary, hidden_of, stored_boundary
from .ops import linear_cross_entropy as lce
from .ops.reconstruction_loss import _BACKENDS

SUPPORTED_FAMILIES = (
    "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text), Phi3, GPT-2, GPT-NeoX, and any decoder-only "
    "causal LM whose backbone runs an nn.ModuleList of config.num_hidden_layers layers"
)
MODES = ("activation_free", "stored")
AUX_MASKS = ("all", "tokens")
FUSED_CE = ("auto", "liger", "torch", "off")
# Config attributes through which a family transforms logits beyond ``lm_head(hidden)``; the fused
# task loss honours only final-logit soft-capping and steps aside for the others.
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_scale_factor")
AUX_DECODERS_ATTR = "lopt_aux_decoders"
_STATE_ATTR = "_lopt_state"
MISSING_AUX_MESSAGE = (
    "lopt_kernels: a backward reached the LoPT boundary through the task path, but the loss being "
    "backpropagated does not contain the aux term, so the blocks below the boundary get no gradient. "
    "Backpropagate the patched model's out.loss, add lambda_aux * out.aux_loss to your own loss, or call "
    "lopt_kernels.attach(trainer) for Trainer/TRL trainers that build their own loss."
)


class LoptPatchError(ValueError):
    """A model or an option that ``patch``/``unpatch`` cannot accept; the model is left untouched."""


@dataclass(frozen=True)
class LoptSettings:
    boundaries: tuple[int, ...]
    lambda_aux: float
    mode: str
    backend: str
    aux_mask: str
    fused_ce: str


@dataclass
class _PassState:
    """Per-forward bookkeeping, reset when the backbone starts a forward."""

    active: bool = False
    tapes: dict = field(default_factory=dict)
    aux_terms: list = field(default_factory=list)
    grad_was_enabled: bool | None = None
    layerwise_rebuild: bool = False
    token_rows: torch.Tensor | None = None


@dataclass
class _TaskRequest:
    """A training forward with labels whose task loss the fused linear cross-entropy computes."""

    labels: torch.Tensor | None
    shift_labels: torch.Tensor
    num_items_in_batch: object
    hidden: torch.Tensor | None = None


@dataclass
class PatchState:
    settings: LoptSettings
    causal_lm: nn.Module
    backbone: nn.Module
    layers: nn.ModuleList
    decoders: nn.ModuleList
    untied_embeddings: bool
    ignore_on_save: tuple[str, ...]
    handles: list = field(default_factory=list)
    replaying: bool = False
    current: _PassState = field(default_factory=_PassState)
    forward_signature: inspect.Signature | None = None
    task_request: _TaskRequest | None = None
    fused_ce_impl: str | None = None  # resolved lazily on the first training forward
    notices: set = field(default_factory=set)
    bottom_fsdp2: bool | None = None  # whether FSDP2 shards the non-final blocks (checked on first use)

    def notice_once(self, key: str, message: str) -> None:
        if key not in self.notices:
            self.notices.add(key)
            warnings.warn(message, stacklevel=3)

    @property
    def block_starts(self) -> tuple[int, ...]:
        return (0, *self.settings.boundaries)

    def block_range(self, b: int) -> range:
        starts = (*self.block_starts, len(self.layers))
        return range(starts[b], starts[b + 1])


# ----------------------------------------------------------------------------------------------
# discovery and validation
# ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def _text_config(lm):
    config = getattr(lm, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _find_layer_stack(lm: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    config = _text_config(lm)
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise LoptPatchError(
            f"{type(lm).__name__}: its config has no num_hidden_layers, so no decoder layer stack can be found. "
            f"Supported: {SUPPORTED_FAMILIES}."
        )
    candidates = []
    for name, module in lm.named_modules():
        if name.startswith(AUX_DECODERS_ATTR):
            continue
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name:
            if len({type(m) for m in module}) == 1:
                candidates.append(name)
    if not candidates:
        raise LoptPatchError(
            f"{type(lm).__name__}: no nn.ModuleList of {num_layers} identical decoder layers was found. "
            f"Supported: {SUPPORTED_FAMILIES}."
        )
    name = min(candidates, key=lambda n: (n.count("."), n))
    owner_name, _, attr = name.rpartition(".")
    backbone = lm.get_submodule(owner_name) if owner_name else lm
    return backbone, attr, lm.get_submodule(name)


def even_block_starts(num_layers: int, num_blocks: int) -> tuple[int, ...]:
    """Start layer of blocks 1..k-1: widths ``L // k``, the first ``L % k`` blocks one layer wider."""
    base, extra = divmod(num_layers, num_blocks)
    starts, pos = [], 0
    for b in range(num_blocks - 1):
        pos += base + (1 if b < extra else 0)
        starts.append(pos)
    return tuple(starts)


def _resolve_boundaries(num_layers: int, num_blocks, boundaries) -> tuple[int, ...]:
    if boundaries is not None:
        try:
            bounds = tuple(int(b) for b in boundaries)
        except (TypeError, ValueError):
            raise LoptPatchError(f"boundaries must be a sequence of layer indices, got {boundaries!r}") from None
        if not bounds:
            raise LoptPatchError("boundaries must name at least one layer index (the start of the second block)")
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise LoptPatchError(f"boundaries must be strictly increasing, got {list(bounds)}")
        if bounds[0] < 1 or bounds[-1] > num_layers - 1:
            raise LoptPatchError(
                f"boundaries must lie in [1, {num_layers - 1}] for a model with {num_layers} layers "
                f"(each is the first layer of a new block), got {list(bounds)}"
            )
        if num_blocks is not None and num_blocks != len(bounds) + 1:
            raise LoptPatchError(
                f"num_blocks={num_blocks} contradicts boundaries={list(bounds)} ({len(bounds) + 1} blocks); pass one of them"
            )
        return bounds
    k = 2 if num_blocks is None else num_blocks
    if isinstance(k, bool) or not isinstance(k, int):
        raise LoptPatchError(f"num_blocks must be an integer, got {k!r}")
    if k < 2 or k > num_layers:
        raise LoptPatchError(f"num_blocks must be between 2 and the number of layers ({num_layers}), got {k}")
    return even_block_starts(num_layers, k)


def _validate(model, num_blocks, boundaries, lambda_aux, mode, backend, aux_mask, fused_ce):
    lm = _unwrap(model)
    try:
        from transformers import PreTrainedModel  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = nn.Module
    if not isinstance(lm, PreTrainedModel) or lm.get_output_embeddings() is None or lm.get_input_embeddings() is None:
        raise LoptPatchError(
            f"lopt_kernels.patch needs a Hugging Face causal LM (AutoModelForCausalLM), got {type(lm).__name__}. "
            f"Supported: {SUPPORTED_FAMILIES}."
        )
    backbone, attr, layers = _find_layer_stack(lm)
    bounds = _resolve_boundaries(len(layers), num_blocks, boundaries)
    try:
        lam = float(lambda_aux)
    except (TypeError, ValueError):
        raise LoptPatchError(f"lambda_aux must be a number >= 0, got {lambda_aux!r}") from None
    if math.isnan(lam) or lam < 0 or math.isinf(lam):
        raise LoptPatchError(f"lambda_aux must be a finite number >= 0, got {lambda_aux!r}")
    if mode not in MODES:
        raise LoptPatchError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in _BACKENDS:
        raise LoptPatchError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if aux_mask not in AUX_MASKS:
        raise LoptPatchError(f"aux_mask must be one of {AUX_MASKS}, got {aux_mask!r}")
    if fused_ce not in FUSED_CE:
        raise LoptPatchError(f"fused_ce must be one of {FUSED_CE}, got {fused_ce!r}")
    return lm, backbone, layers, LoptSettings(bounds, lam, mode, backend, aux_mask, fused_ce)


# ----------------------------------------------------------------------------------------------
# hooks
# ----------------------------------------------------------------------------------------------


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A layer call that neither reads nor writes a KV cache (training does not need one, and a replay
    must not append to it a second time)."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _autocast_state(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return (device_type, True, torch.get_autocast_dtype(device_type))
    except (TypeError, RuntimeError):  # pragma: no cover - older torch signatures
        pass
    return None


def _fsdp2_sharded(layers) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for layer in layers for m in layer.modules())


def _backbone_pre_hook(state: PatchState):
    def hook(module, args, kwargs):
        if state.replaying:
            return None
        run = _PassState(active=module.training and torch.is_grad_enabled())
        if run.active:
            if state.bottom_fsdp2 is None:  # once: sharding happens before training starts
                state.bottom_fsdp2 = _fsdp2_sharded(state.layers[: state.block_starts[-1]])
            final_layers = state.layers[state.block_starts[-1] :]
            run.layerwise_rebuild = any(getattr(layer, "gradient_checkpointing", False) for layer in final_layers)
            if state.settings.aux_mask == "tokens":
                run.token_rows = _token_rows(state, kwargs.get("attention_mask"))
        state.current = run
        return None

    return hook


def _token_rows(state: PatchState, attention_mask) -> torch.Tensor | None:
    """Flat indices of the non-padding positions, or None when every position is a token."""
    if attention_mask is None:
        return None  # no padding (e.g. a padding-free packed batch)
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        state.notice_once(
            "aux_mask",
            "lopt_kernels: aux_mask='tokens' needs a 2-D attention_mask (batch, seq) to find padding; got "
            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}. The aux loss counts every position.",
        )
        return None
    flat = attention_mask.reshape(-1)
    if bool(flat.all()):
        return None
    return flat.nonzero().squeeze(1)


def _backbone_post_hook(state: PatchState):
    def hook(module, args, kwargs, output):
        run = state.current
        if run.grad_was_enabled is not None:  # an exception escaped a block: restore grad mode
            torch.set_grad_enabled(run.grad_was_enabled)
            run.grad_was_enabled = None
        run.tapes.clear()
        return None

    return hook


def _layer_pre_hook(state: PatchState, block: int, is_start: bool):
    activation_free = state.settings.mode == "activation_free"

    def hook(module, args, kwargs):
        run = state.current
        if not run.active or state.replaying:
            return None
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        if is_start:
            tape = BlockTape(x=hidden, autocast=_autocast_state(hidden.device.type))
            run.tapes[block] = tape
            if activation_free:
                run.grad_was_enabled = torch.is_grad_enabled()
                torch.set_grad_enabled(False)
        if not activation_free:
            return None
        rest, kwargs = _without_cache(rest, kwargs)
        call = LayerCall(module, rest, kwargs, cpu_rng=torch.get_rng_state())
        if hidden.device.type == "cuda":
            call.device_rng = torch.cuda.get_rng_state(hidden.device)
        run.tapes[block].calls.append(call)
        return (hidden, *rest), kwargs

    return hook


def _layer_post_hook(state: PatchState, block: int):
    activation_free = state.settings.mode == "activation_free"

    def hook(module, args, kwargs, output):
        run = state.current
        if not run.active or state.replaying:
            return None
        tape = run.tapes.pop(block)
        y = hidden_of(output)
        spec = BoundarySpec(
            decoder=state.decoders[block],
            backend=state.settings.backend,
            layerwise_rebuild=run.layerwise_rebuild,
            replay_guard=state,
            token_rows=run.token_rows,
            # FSDP2 reduces gradients from hooks on the unsharded parameters' accumulation, so the
            # rebuild must accumulate; DDP's reducer needs them from the outer backward instead.
            accumulate_into_grad=bool(state.bottom_fsdp2) or not _distributed(),
            on_missing_aux=lambda: state.notice_once("missing_aux", MISSING_AUX_MESSAGE),
        )
        if activation_free:
            torch.set_grad_enabled(run.grad_was_enabled)
            run.grad_was_enabled = None
            x = tape.x if block == 0 else tape.x.detach()
            hand_off, aux = apply_boundary(spec, tape, y, x)
        else:
            hand_off, aux = stored_boundary(spec, y, tape.x)
        run.aux_terms.append(aux)
        if isinstance(output, tuple):
            return (hand_off, *output[1:])
        if isinstance(output, list):
            return [hand_off, *output[1:]]
        return hand_off

    return hook


def _distributed() -> bool:
    """Whether a process group is up (DDP/FSDP reducers expect gradients from the outer backward)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def label_count(inputs) -> torch.Tensor | None:
    """Label tokens of a micro-batch after the causal shift (``shift_labels`` wins), or None without labels."""
    if not isinstance(inputs, dict):
        return None
    shift_labels = inputs.get("shift_labels")
    if torch.is_tensor(shift_labels):
        return (shift_labels != -100).sum()
    labels = inputs.get("labels")
    if torch.is_tensor(labels) and labels.dim() >= 1:
        return (labels[..., 1:] != -100).sum()
    return None


def _fused_ce_impl(state: PatchState, device: torch.device) -> str | None:
    """The fused task-loss implementation for this model, or None (with a one-time notice) where the
    model's own loss must run because no fused path reproduces it exactly."""
    if state.fused_ce_impl is not None:
        return state.fused_ce_impl or None
    lm, setting = state.causal_lm, state.settings.fused_ce
    impl, reason = None, None
    from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: PLC0415

    config = _text_config(lm)
    softcap = getattr(config, "final_logit_softcapping", None)
    head = lm.get_output_embeddings()
    transforms = [a for a in _LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]
    if setting == "off":
        pass
    elif getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        reason = f"{type(lm).__name__} uses its own loss function, not ForCausalLMLoss"
    elif type(head) is not nn.Linear:
        reason = f"its output head is a {type(head).__name__}, not a plain nn.Linear (e.g. adapted by PEFT)"
    elif transforms:
        reason = f"its config transforms logits ({', '.join(transforms)})"
    else:
        impl = lce.resolve_implementation(setting, device, softcap)
        if impl is None:
            reason = f"final logit soft-capping ({softcap}) is not supported by the {setting!r} implementation on {device.type}"
    if reason:
        state.notice_once("fused_ce", f"lopt_kernels: the fused task loss is off for this model because {reason}; "
                                      "the model's own (logit-materialising) loss runs instead.")
    state.fused_ce_impl = impl or ""
    return impl


def _causal_lm_pre_hook(state: PatchState):
    def hook(module, args, kwargs):
        state.task_request = None
        if state.settings.fused_ce == "off" or not (module.training and torch.is_grad_enabled()) or args:
            return None
        if "forward" in module.__dict__:
            # The forward was replaced on the instance (TRL's fused LM head, Liger's fused linear CE): the
            # replacement owns the head and the loss, and may need the labels itself.
            return None
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift_labels is None:
            return None
        if _fused_ce_impl(state, labels.device if labels is not None else shift_labels.device) is None:
            return None
        if shift_labels is None:
            shift_labels = lce.shift_labels_of(labels)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "shift_labels")}
        state.task_request = _TaskRequest(labels, shift_labels, kwargs.get("num_items_in_batch"))
        return args, kwargs

    return hook


def _output_head_pre_hook(state: PatchState):
    def hook(module, args):
        request = state.task_request
        if request is None or request.hidden is not None or not args:
            return None
        hidden = args[0]
        if hidden.shape[:-1] != request.shift_labels.shape:
            return None  # e.g. logits_to_keep sliced the positions: let the model compute its logits
        request.hidden = hidden
        # The head then runs on zero positions: the logits are never materialised.
        return (hidden[..., :0, :], *args[1:])

    return hook


def _causal_lm_post_hook(state: PatchState):
    def hook(module, args, kwargs, output):
        run = state.current
        request, state.task_request = state.task_request, None
        if output is None:  # the forward raised
            run.aux_terms = []
            return None
        if request is not None:
            kwargs = {**kwargs, "labels": request.labels, "shift_labels": request.shift_labels}
            if request.hidden is not None:
                head = state.causal_lm.get_output_embeddings()
                task = lce.linear_cross_entropy(
                    request.hidden, head.weight, request.shift_labels, bias=head.bias,
                    num_items_in_batch=request.num_items_in_batch,
                    softcap=getattr(_text_config(state.causal_lm), "final_logit_softcapping", None),
                    impl=state.fused_ce_impl,
                )
                if not isinstance(output, tuple):
                    # Rebuilt so that ``loss`` keeps its place first in the output's key order.
                    output = type(output)(**{**output, "loss": task, "logits": None})
        if not run.aux_terms:
            return output if request is not None else None
        terms, run.aux_terms = run.aux_terms, []
        aux = terms[0] if len(terms) == 1 else torch.stack([t.to(terms[0].device) for t in terms]).mean()
        bound = kwargs
        if args:
            if state.forward_signature is None:
                state.forward_signature = inspect.signature(module.forward)
            bound = state.forward_signature.bind_partial(*args, **kwargs).arguments
        weight = 1.0
        num_items = bound.get("num_items_in_batch")
        if num_items is not None:
            count = label_count(bound)
            if count is not None:
                weight = count.to(aux.device, torch.float32) / torch.as_tensor(num_items, device=aux.device).float()
        lam = state.settings.lambda_aux
        if isinstance(output, tuple):
            if output and torch.is_tensor(output[0]) and output[0].dim() == 0:
                return (output[0] + lam * weight * aux.to(output[0].device), *output[1:])
            return None
        output = with_lopt_fields(output)  # task_loss/aux_loss as dataclass fields: pytree rebuilds (DDP) work
        task = output.get("loss")
        if task is not None:
            output["loss"] = task + (lam * weight * aux).to(task.device, task.dtype)
        output["task_loss"] = task
        output["aux_loss"] = aux
        return output

    return hook


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _state_of(model: nn.Module) -> PatchState | None:
    return getattr(_unwrap(model), _STATE_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch`` has been applied to ``model`` (or to the causal LM it wraps)."""
    return _state_of(model) is not None


def _untie_embeddings(lm) -> bool:
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    if out.weight is not inp.weight:
        return False
    tied = inp.weight
    out.weight = nn.Parameter(tied.detach().clone(), requires_grad=tied.requires_grad)
    configs = {id(c): c for c in (lm.config, _text_config(lm))}
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
    mode: str = "activation_free",
    backend: str = "auto",
    aux_mask: str = "all",
    fused_ce: str = "auto",
) -> nn.Module:
    """Turn a Hugging Face causal LM into a LoPT model, in place, and return it.

    ``num_blocks`` (default 2, the midpoint) splits the layers into contiguous blocks; ``boundaries``
    gives the first layer index of each block after the first instead. ``lambda_aux`` weights the
    reconstruction loss; ``mode="activation_free"`` keeps only each non-final block's input and
    rebuilds the block in its backward, ``"stored"`` keeps its activations (the reference's
    behaviour, same gradients). ``backend`` selects the fused-loss kernels (``"auto"``: Triton on
    CUDA tensors, chunked PyTorch elsewhere). ``aux_mask="tokens"`` leaves padding positions out of
    the aux loss (``"all"``, the reference, counts them). ``fused_ce`` computes the task loss in
    training without materialising logits (``"auto"``: Liger on CUDA, torch's chunked
    ``linear_cross_entropy`` elsewhere; ``"off"``: the model's own loss, logits returned).
    """
    lm, backbone, layers, settings = _validate(
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
    untied = _untie_embeddings(lm)
    hidden = _text_config(lm).hidden_size
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
    handles.append(backbone.register_forward_pre_hook(_backbone_pre_hook(state), with_kwargs=True))
    handles.append(backbone.register_forward_hook(_backbone_post_hook(state), with_kwargs=True, always_call=True))
    for b in range(len(settings.boundaries)):
        block = range(starts[b], starts[b + 1])
        for i in block:
            pre = _layer_pre_hook(state, b, is_start=(i == block.start))
            handles.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layers[block.stop - 1].register_forward_hook(_layer_post_hook(state, b), with_kwargs=True))
    handles.append(lm.register_forward_pre_hook(_causal_lm_pre_hook(state), with_kwargs=True))
    handles.append(lm.get_output_embeddings().register_forward_pre_hook(_output_head_pre_hook(state)))
    handles.append(lm.register_forward_hook(_causal_lm_post_hook(state), with_kwargs=True, always_call=True))
    setattr(lm, _STATE_ATTR, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the hooks and aux decoders ``patch`` added; untied embeddings stay untied."""
    state = _state_of(model)
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


def _require_state(model) -> PatchState:
    state = _state_of(model)
    if state is None:
        raise LoptPatchError(f"{type(model).__name__} is not patched: call lopt_kernels.patch(model) first")
    return state


def aux_decoders(model: nn.Module) -> list[AuxDecoder]:
    """The aux decoders in block order (one per non-final block)."""
    return list(_require_state(model).decoders)


def _top_and_bottom(state: PatchState) -> tuple[set[int], set[int]]:
    """Parameter ids trained by the task loss (final block, final norm, head) and by the local loss."""
    layers, backbone = state.layers, state.backbone
    bottom: set[int] = set()
    for layer in layers[: state.block_starts[-1]]:
        bottom.update(id(p) for p in layer.parameters())
    bottom.update(id(p) for p in state.decoders.parameters())
    # Backbone modules registered before the layer stack (embeddings) feed block 0.
    for child in backbone.children():
        if child is layers:
            break
        bottom.update(id(p) for p in child.parameters())
    bottom.update(id(p) for p in state.causal_lm.get_input_embeddings().parameters())
    top = {id(p) for p in state.causal_lm.parameters()} - bottom
    return top, bottom


def param_groups(model: nn.Module, lr: float, local_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimiser groups: the final block, final norm and head at ``lr``; the earlier blocks, the
    embeddings and the aux decoders at ``local_lr`` (default ``lr``). With ``weight_decay > 0``,
    biases and norm weights (1-D tensors) get no decay, as in the HF Trainer."""
    state = _require_state(model)
    top, bottom = _top_and_bottom(state)
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
