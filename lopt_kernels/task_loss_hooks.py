"""Hooks on the causal LM and its output head: the fused task loss (no logits) and the output's
LoPT fields (``loss = task + lambda_aux * aux``, ``task_loss``, ``lopt_aux_loss`` and, where the model's
output has no ``aux_loss`` of its own, ``aux_loss``).

``task_loss`` is the loss the unpatched model returns, a MoE model's router term
(``router_aux_loss_coef * aux_loss``) included; ``aux_loss`` of a MoE model stays its router loss."""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from . import block_hooks
from ._outputs import declares_own_aux_loss, with_lopt_fields
from .boundary.common import autocast_state
from .discovery import text_config
from .hf_model import (LOGIT_TRANSFORMS, forward_calls_loss_function, identity_scale, logit_transforms_in_forward,
                       loss_terms_from_logits_in_forward, router_loss_coef)
from .ops import linear_cross_entropy as lce
from .state import PatchState, StateHook, TaskRequest


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


def item_share(count: torch.Tensor, num_items, device: torch.device) -> torch.Tensor:
    """``count / num_items`` on ``device`` (fp32) without a host-device sync: a Python number stays a Python
    number, a tensor is copied with ``non_blocking``. A window without label tokens (``num_items == 0``)
    gives a share of 0, not NaN: its micro-batches carry no task gradient and no aux weight."""
    count = count.to(device, torch.float32, non_blocking=True)
    if not torch.is_tensor(num_items):
        return count / num_items if num_items != 0 else count * 0.0
    n = num_items.to(device, torch.float32, non_blocking=True)
    nonzero = n != 0
    return torch.where(nonzero, count / torch.where(nonzero, n, torch.ones_like(n)), torch.zeros_like(n))


def fused_ce_choice(lm, setting: str, device: torch.device) -> tuple[str | None, str | None]:
    """``(implementation, None)`` when a fused linear cross-entropy reproduces ``lm``'s own loss exactly
    under ``setting`` on ``device``, else ``(None, reason)`` (``(None, None)`` for ``setting="off"``)."""
    from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: PLC0415

    config = text_config(lm)
    softcap = getattr(config, "final_logit_softcapping", None)
    head = lm.get_output_embeddings()
    transforms = [a for a in LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]
    if setting == "off":
        return None, None
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return None, f"{type(lm).__name__} uses its own loss function, not ForCausalLMLoss"
    if not forward_calls_loss_function(type(lm)):
        return None, (f"{type(lm).__name__}'s forward computes its loss with its own code, not self.loss_function "
                      "(ForCausalLMLoss, labels shifted by one)")
    if not _plain_linear(head):
        return None, f"its output head is a {type(head).__name__}, not a plain nn.Linear (e.g. adapted by PEFT)"
    if _fsdp2_reshards_after_forward(head):
        return None, ("FSDP2 reshards its output head right after the head's forward (fully_shard on the head with "
                      "reshard_after_forward=True), and the fused loss reads the whole weight after that forward; "
                      "shard the head with reshard_after_forward=False (as accelerate does, grouped with the final "
                      "norm) or leave it to the root module")
    if transforms:
        return None, f"its config transforms logits ({', '.join(transforms)})"
    head_name = next((name for name, child in lm.named_children() if child is head), "lm_head")
    for text, scale in logit_transforms_in_forward(type(lm), head_name):
        if scale is None or not identity_scale(lm, scale):
            return None, f"its forward transforms the output head's logits before the loss ({text.splitlines()[0]})"
    for text in loss_terms_from_logits_in_forward(type(lm), head_name):
        return None, (f"its forward computes its loss from the logits other than through its loss function "
                      f"({text.splitlines()[0]})")
    if hasattr(config, "output_router_logits") and router_loss_coef(lm) is None:
        return None, "it is a mixture-of-experts model whose router-loss coefficient is unknown"
    # a soft-cap of 0 (or < 0, inf) is no soft-capping setting: an error, not a fallback to the model's NaN logits
    lce.check_softcap(softcap, name=f"{type(lm).__name__}'s config.final_logit_softcapping")
    impl = lce.resolve_implementation(setting, device, softcap)
    if impl is None:
        return None, (f"final logit soft-capping ({softcap}) is not supported by the {setting!r} implementation on "
                      f"{device.type}")
    return impl, None


def _plain_linear(module: nn.Module) -> bool:
    """``nn.Linear`` itself, or the class FSDP2's ``fully_shard`` swaps in for it (``FSDPLinear``: the same forward,
    with hooks that unshard its parameters around it)."""
    cls = type(module)
    if cls is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return False
    return cls.__bases__ == (FSDPModule, nn.Linear)


def _fsdp2_reshards_after_forward(module: nn.Module) -> bool:
    """Whether FSDP2 frees ``module``'s unsharded parameters when its own forward ends (its parameter group's
    ``reshard_after_forward``). False for a module FSDP2 does not shard itself, e.g. a head left to the root."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        return False
    # FSDP2 keeps the setting only on its parameter groups (None: the parameters stay unsharded until backward)
    return any(group.post_forward_mesh_info is not None for group in get_state()._fsdp_param_groups)


def _fused_ce_inputs(lm, device: torch.device) -> tuple:
    """What ``fused_ce_choice`` depends on that can change after patching, as a tuple compared on every training
    forward (a few attribute reads): the output head (``resize_token_embeddings``, PEFT adapting ``lm_head``), the
    loss function (``model.loss_function = ...``), the config's logit transforms, the device."""
    config = text_config(lm)
    head = lm.get_output_embeddings()
    return (head, type(head), _fsdp2_reshards_after_forward(head), getattr(lm, "loss_function", None), device.type,
            getattr(config, "final_logit_softcapping", None), tuple(getattr(config, a, None) for a in LOGIT_TRANSFORMS))


def fused_ce_impl(state: PatchState, device: torch.device) -> str | None:
    """The fused task-loss implementation for this model, or None (with a notice, once per reason) where the
    model's own loss must run because no fused path reproduces it exactly. Decided anew whenever what the
    decision depends on changed since the last training forward."""
    key = _fused_ce_inputs(state.causal_lm, device)
    if state.fused_ce_impl is not None and state.fused_ce_key is not None and len(key) == len(state.fused_ce_key) \
            and all(a is b or a == b for a, b in zip(key, state.fused_ce_key)):
        return state.fused_ce_impl or None
    impl, reason = fused_ce_choice(state.causal_lm, state.settings.fused_ce, device)
    if reason:
        state.notice_once(f"fused_ce: {reason}", f"lopt_kernels: the fused task loss is off for this model because "
                                                 f"{reason}; the model's own (logit-materialising) loss runs instead.")
    state.fused_ce_impl, state.fused_ce_key = impl or "", key
    return impl


def with_router_loss(lm, task: torch.Tensor, router_loss) -> torch.Tensor:
    """The fused task loss plus the model's router term, as the model's own forward adds it when it gets the
    labels (``loss += router_aux_loss_coef * aux_loss``): the fused loss equals the unpatched ``loss``."""
    if not torch.is_tensor(router_loss):
        return task
    return task + router_loss_coef(lm) * router_loss.to(task.device, non_blocking=True)


def _fusable_shapes(kwargs, labels: torch.Tensor, shift_labels) -> bool:
    """Whether the fused loss sees exactly the model's positions: no ``logits_to_keep`` slicing, and labels
    (and shift_labels) of the inputs' (batch, length) shape. Shapes only: no host-device sync."""
    keep = kwargs.get("logits_to_keep", 0)
    if torch.is_tensor(keep) or keep != 0:
        return False
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if torch.is_tensor(ids):
        positions = ids.shape
    elif torch.is_tensor(embeds):
        positions = embeds.shape[:-1]
    else:
        return False
    return labels.shape == positions and (shift_labels is None or shift_labels.shape == positions)


_IMPLEMENTATION_NAMES = {"liger": "Liger's fused linear cross-entropy", "torch": "torch's fused linear cross-entropy",
                         "chunked": "the library's chunked linear cross-entropy"}


def _second_backward_message(state: PatchState) -> str:
    impl = state.fused_ce_impl
    message = (
        f"lopt_kernels: a second backward (retain_graph=True) reached the fused task loss (fused_ce={state.settings.fused_ce!r}: "
        f"{_IMPLEMENTATION_NAMES.get(impl, impl)}, which supports one backward per forward). "
        "To backpropagate twice through one output, patch with fused_ce='off' (the model's own loss, logits materialised)"
    )
    boundary = state.current.boundary
    if boundary is not None and boundary.one_backward:
        message += " and with mode='activation_free' or mode='stored' (the eager boundary also allows one backward)"
    return message + "."


class _OneBackward(torch.autograd.Function):
    """Identity on the fused task loss whose second backward raises ``message``: torch's op refuses a second
    backward with a message that does not say what to change, Liger's rescales its saved gradients in place
    (a second backward would be silently wrong)."""

    @staticmethod
    def forward(ctx, loss, message):
        ctx.message, ctx.used = message, False
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError(ctx.message)
        ctx.used = True
        return grad, None


def follow_embeddings(state: PatchState) -> None:
    """Hook the causal LM's current input embeddings and output head, moving the hooks from the modules they were
    on if those were replaced: ``resize_token_embeddings`` after ``patch`` puts a new head module in place."""
    lm = state.causal_lm
    for key, module, register in (
        ("input", lm.get_input_embeddings(),
         lambda m: m.register_forward_hook(StateHook(block_hooks.input_embeddings_hook, state))),
        ("head", lm.get_output_embeddings(),
         lambda m: m.register_forward_pre_hook(StateHook(output_head_pre_hook, state))),
    ):
        hooked = state.embedding_hooks.get(key)
        if module is None or (hooked is not None and hooked[0] is module):
            continue
        if hooked is not None:
            hooked[1].remove()
            state.handles.remove(hooked[1])
        handle = register(module)
        state.handles.append(handle)
        state.embedding_hooks[key] = (module, handle)


REPLACED_FORWARD_MESSAGE = (
    "lopt_kernels: the causal LM's forward was replaced on the instance ({name}), so the replacement computes the "
    "task loss (LoPT's gradient boundary and aux term are unchanged); the fused task loss, which needs the model's "
    "own forward, is off for this model; whether the logits are materialised is the replacement's choice (TRL's and "
    "Liger's fused heads do not)."
)


def _transparent_wrapper_files() -> tuple[str, ...]:
    """Source files of the forward wrappers known to call the wrapped forward with the same arguments and to leave
    the loss alone: accelerate's output cast to fp32 and torch's autocast decorator (``Accelerator.prepare``)."""
    names = ("accelerate.utils.operations", "torch.amp.autocast_mode")
    return tuple(f for f in (getattr(sys.modules.get(n), "__file__", None) for n in names) if f)


def wraps_class_forward(module: nn.Module) -> bool:
    """Whether the forward set on ``module`` itself only wraps its class's forward through wrappers known to be
    transparent (accelerate's mixed-precision ``prepare``: autocast, then outputs cast to fp32), so that the class's
    forward still runs with the arguments the hooks saw. ``functools.wraps`` alone says nothing: TRL's fused-LM-head
    forward wraps the class's forward that way and computes its own loss."""
    fn, own, seen, files = module.__dict__.get("forward"), type(module).forward, set(), _transparent_wrapper_files()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if fn is own:
            return True
        if inspect.ismethod(fn):
            fn = fn.__func__
            continue
        code = getattr(fn, "__code__", None)
        origin = code.co_filename if code is not None else getattr(sys.modules.get(type(fn).__module__), "__file__", None)
        if origin not in files:
            return False
        fn = getattr(fn, "__wrapped__", None)
    return False


def causal_lm_pre_hook(state: PatchState):
    def hook(module, args, kwargs):
        state.task_request = None
        follow_embeddings(state)
        if state.settings.fused_ce == "off" or not (module.training and torch.is_grad_enabled()) or args:
            return None
        if "forward" in module.__dict__ and not wraps_class_forward(module):
            # The forward was replaced on the instance (TRL's fused LM head, Liger's fused linear CE): the
            # replacement owns the head and the loss, and may need the labels itself.
            state.notice_once("replaced_forward", REPLACED_FORWARD_MESSAGE.format(
                name=getattr(module.__dict__["forward"], "__qualname__", type(module.__dict__["forward"]).__name__)))
            return None
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None:
            return None  # the model computes no loss without labels (shift_labels alone included)
        if not _fusable_shapes(kwargs, labels, shift_labels):
            # Labels that do not line up with the positions, or logits_to_keep: the model's own loss runs,
            # raising the model's own error or computing the model's own loss on the kept positions.
            return None
        if kwargs.get("return_dict", getattr(module.config, "return_dict", True)) is False:
            # A tuple output has no named fields: the model's own loss and logits keep their positions
            # ((loss, logits, ...), as unpatched); the post hook adds lambda_aux * aux to the loss.
            return None
        if fused_ce_impl(state, labels.device) is None:
            return None
        if shift_labels is None:
            shift_labels = lce.shift_labels_of(labels)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "shift_labels")}
        state.task_request = TaskRequest(labels, shift_labels, kwargs.get("num_items_in_batch"))
        return args, kwargs

    return hook


def output_head_pre_hook(state: PatchState):
    def hook(module, args):
        request = state.task_request
        if request is None or request.hidden is not None or not args:
            return None
        hidden = args[0]
        if hidden.shape[:-1] != request.shift_labels.shape:
            return None  # e.g. logits_to_keep sliced the positions: let the model compute its logits
        request.hidden = hidden
        autocast = autocast_state(hidden.device.type)
        request.autocast = autocast[::2] if autocast is not None else None
        # The head then runs on zero positions: the logits are never materialised.
        return (hidden[..., :0, :], *args[1:])

    return hook


def head_task_loss(lm, hidden, shift_labels, *, num_items_in_batch, impl: str, autocast=None) -> torch.Tensor:
    """``lm``'s causal-LM loss from its output head's input ``hidden``, by the fused linear cross-entropy ``impl``:
    the head's weight and bias, its ``final_logit_softcapping``, and (``autocast``: the ``(device type, dtype)`` the
    head ran under) the dtype its logits were computed in."""
    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if autocast is not None and autocast[0] == hidden.device.type:
        # the head ran under autocast (accelerate's AMP): its logits were computed in that dtype
        dtype = autocast[1]
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return lce.linear_cross_entropy(hidden, weight, shift_labels, bias=bias, num_items_in_batch=num_items_in_batch,
                                    softcap=getattr(text_config(lm), "final_logit_softcapping", None), impl=impl)


def causal_lm_post_hook(state: PatchState):
    def hook(module, args, kwargs, output):
        run = state.current
        request, state.task_request = state.task_request, None
        if output is None:  # the forward raised
            run.aux_terms = []
            return None
        if request is not None:
            kwargs = {**kwargs, "labels": request.labels, "shift_labels": request.shift_labels}
            if request.hidden is None:
                # The labels were taken for the fused loss but the output head never ran on positions that
                # match them: the model would silently return no loss. (The pre hook's shape checks make
                # this unreachable for the transformers families; a custom forward may still get here.)
                raise RuntimeError(
                    f"lopt_kernels: the fused task loss found no output-head input matching the labels {tuple(request.shift_labels.shape)} "
                    f"in this {type(module).__name__} forward, so it cannot compute the loss; patch with fused_ce='off' "
                    "to let the model compute its own loss."
                )
            if request.hidden is not None:
                task = head_task_loss(state.causal_lm, request.hidden, request.shift_labels,
                                      num_items_in_batch=request.num_items_in_batch, impl=state.fused_ce_impl,
                                      autocast=request.autocast)
                task = _OneBackward.apply(task, _second_backward_message(state))
                if not isinstance(output, tuple):
                    task = with_router_loss(state.causal_lm, task, output.get("aux_loss"))
                    # Rebuilt so that ``loss`` keeps its place first in the output's key order.
                    output = type(output)(**{**output, "loss": task, "logits": None})
        if not run.aux_terms:
            return output if request is not None else None
        terms, run.aux_terms = run.aux_terms, []
        # eager blocks' aux terms enter the graph now, after every node of the task loss: the caller's backward
        # then runs them first and their held gradients never stack on the loss's backward working set
        fused = request is not None and request.hidden is not None
        second_backward = _second_backward_message(state) if fused else None
        terms = [run.boundary.aux_loss(t, second_backward) for t in terms]
        aux = terms[0] if len(terms) == 1 else torch.stack([t.to(terms[0].device, non_blocking=True) for t in terms]).mean()
        bound = kwargs
        if args:
            if state.forward_signature is None:
                state.forward_signature = inspect.signature(module.forward)
            bound = dict(state.forward_signature.bind_partial(*args, **kwargs).arguments)
            for name, param in state.forward_signature.parameters.items():
                if param.kind is param.VAR_KEYWORD:  # num_items_in_batch reaches HF forwards through **kwargs
                    bound.update(bound.pop(name, {}))
        weight = 1.0
        num_items = bound.get("num_items_in_batch")
        if num_items is not None:
            count = label_count(bound)
            if count is not None:
                weight = item_share(count, num_items, aux.device)
        lam = state.settings.lambda_aux
        if isinstance(output, tuple):
            if output and torch.is_tensor(output[0]) and output[0].dim() == 0:
                return (output[0] + lam * weight * aux.to(output[0].device, non_blocking=True), *output[1:])
            return None
        own_aux = declares_own_aux_loss(type(output))
        output = with_lopt_fields(output)  # LoPT's fields as dataclass fields: pytree rebuilds (DDP) work
        task = output.get("loss")
        if task is not None:
            output["loss"] = task + (lam * weight * aux).to(task.device, task.dtype, non_blocking=True)
        output["task_loss"] = task
        if not own_aux:  # dense models: .aux_loss is LoPT's; MoE models keep their router loss there
            output["aux_loss"] = aux
        output["lopt_aux_loss"] = aux  # set in field order, so that pytree rebuilds keep the key order
        return output

    return hook

