"""Checks that whatever trains a patched model also trains its aux decoders.

``patch`` adds the decoders as new parameters, so an optimiser built before it (or from a
``requires_grad`` filter taken while PEFT had frozen them) never steps them: the bottom half would
learn against a frozen random decoder. ``attach`` checks a trainer's optimiser; for a user's own loop a
global optimiser step hook notes every optimiser that steps this model's parameters, and the next
training forward raises if none of them holds the decoders. Deferred to that forward, not raised in
the step, so that a separate optimiser for the decoders may step after the first one.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .discovery import LoptPatchError

_patched_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # causal LMs patched in this process
_stepped: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimiser -> (group sizes, parameter ids)
_hook_handle = None

MISSING_FROM_OPTIMIZER_MESSAGE = (
    "lopt_kernels: an optimiser stepped this patched model's parameters, but no optimiser holds its {n} trainable aux "
    "decoder parameter(s), so the bottom blocks learn against a decoder frozen at its random initialisation. "
    "Build the optimiser after lopt_kernels.patch(model) (and after get_peft_model / ensure_aux_trainable), e.g. "
    "from lopt_kernels.param_groups(model, lr), or add the decoders: "
    "optimizer.add_param_group({{'params': [p for d in lopt_kernels.aux_decoders(model) for p in d.parameters()]}}). "
    "To keep the decoders fixed on purpose, set requires_grad_(False) on them."
)


# DeepSpeed's optimiser wrappers keep the model's parameter objects in these lists of lists (their own
# param_groups hold flattened partitions): ZeRO-1/2 ``bit16_groups``, ZeRO-3 and the fp16/bf16 wrappers
# ``fp16_groups`` / ``bf16_groups``.
_WRAPPED_GROUPS = ("bit16_groups", "fp16_groups", "bf16_groups")


def optimizer_param_ids(optimizer) -> set[int]:
    """The ids of the parameter objects an optimiser updates, through the wrappers around it (accelerate's
    ``AcceleratedOptimizer``, DeepSpeed's ZeRO and mixed-precision optimisers)."""
    ids: set[int] = set()
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        for group in getattr(optimizer, "param_groups", None) or ():
            ids.update(id(p) for p in group.get("params", ()))
        for attr in _WRAPPED_GROUPS:
            groups = getattr(optimizer, attr, None)
            if isinstance(groups, (list, tuple)):
                for group in groups:
                    if isinstance(group, (list, tuple)):
                        ids.update(id(p) for p in group)
        optimizer = getattr(optimizer, "optimizer", None)
    return ids


def _param_ids(optimizer) -> frozenset[int]:
    """``optimizer_param_ids``, cached per optimiser until its groups change size."""
    sizes = tuple(len(g.get("params", ())) for g in getattr(optimizer, "param_groups", ()) or ())
    cached = _stepped.get(optimizer)
    if cached is None or cached[0] != sizes:  # add_param_group since the last look
        cached = (sizes, frozenset(optimizer_param_ids(optimizer)))
        _stepped[optimizer] = cached
    return cached[1]


def _trainable_decoder_params(state) -> list[torch.Tensor]:
    return [p for p in state.decoders.parameters() if p.requires_grad]


def _step_pre_hook(optimizer, args, kwargs) -> None:
    for lm in list(_patched_models):
        state = getattr(lm, "_lopt_state", None)
        if state is None or state.decoders_in_optimizer:
            continue
        ids = _param_ids(optimizer)
        decoders = _trainable_decoder_params(state)
        if decoders and all(id(p) in ids for p in decoders):
            state.decoders_in_optimizer, state.optimizer_without_decoders = True, False
        elif any(id(p) in ids for p in lm.parameters() if p.requires_grad):
            state.optimizer_without_decoders = True


def watch(state) -> None:
    """Start checking the optimisers that step ``state``'s model (the step hook is registered once per process)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_step_pre_hook)
    _patched_models.add(state.causal_lm)


def check_before_forward(state) -> None:
    """At a training forward: raise if an optimiser stepped the model since the last one and none holds the
    decoders (cheap when nothing stepped without them)."""
    _patched_models.add(state.causal_lm)  # a deep copy or an unpickled model is watched from its first forward
    if not state.optimizer_without_decoders or state.decoders_in_optimizer:
        return
    decoders = _trainable_decoder_params(state)
    if not decoders:  # frozen since: nothing to step
        state.optimizer_without_decoders = False
        return
    for optimizer in list(_stepped.keys()):
        ids = _param_ids(optimizer)
        if all(id(p) in ids for p in decoders):
            state.decoders_in_optimizer, state.optimizer_without_decoders = True, False
            return
    state.optimizer_without_decoders = False  # raised once; a caller that catches it is not stopped again
    raise LoptPatchError(MISSING_FROM_OPTIMIZER_MESSAGE.format(n=len(decoders)))
