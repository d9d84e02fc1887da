"""The state ``patch`` attaches to a causal LM: its settings, the modules it hooks, per-forward bookkeeping."""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LoptSettings:
    """What ``patch`` was called with (validated)."""

    boundaries: tuple[int, ...]
    lambda_aux: float
    mode: str
    backend: str
    aux_mask: str
    fused_ce: str


@dataclass
class PassState:
    """Per-forward bookkeeping, reset when the backbone starts a forward."""

    active: bool = False
    boundary: object = None  # the BoundaryMode this forward runs (made when its first block starts)
    aux_terms: list = field(default_factory=list)  # each non-final block's, for boundary.aux_loss
    layerwise_rebuild: bool = False
    row_mask: torch.Tensor | None = None  # aux_mask="tokens": which positions the aux loss counts
    embedding_output: object = None  # weakref to the input embeddings' output in this forward
    cache_requested: bool = False  # the caller passed use_cache=True or a cache object
    cache_skipped: bool = False  # activation-free blocks left a cache the model built by itself unfilled
    replaced_inputs: dict = field(default_factory=dict)  # id(what a block runs on instead of its input) -> the input
    hand_off_nodes: list = field(default_factory=list)  # the autograd nodes of the block boundaries' hand-offs
    # what each non-final block's first layer ran on, if it requires grad: its autograd node, or a weakref to it when
    # it is a leaf (eager's), holding no activation past its block
    block_inputs: list = field(default_factory=list)
    layers_run: set = field(default_factory=set)  # ids of the non-final blocks' layer modules that ran
    blocks_ended: set = field(default_factory=set)  # the non-final blocks whose last layer ran
    # the tensors block 0's first layer read besides its hidden states (and their bases), by id; held until the
    # backbone's forward ends, so that no tensor made later can take one's id
    first_inputs: dict = field(default_factory=dict)
    side_outputs: dict = field(default_factory=dict)  # the tensors the non-final blocks' layers returned besides
    # their hidden states, by id (held until the backbone's forward ends)
    cut_outputs: dict = field(default_factory=dict)  # those of a block's last layer, detached at the boundary

    @property
    def mode(self) -> str:
        """The boundary mode this forward runs ("auto" resolved), or "" before its first block."""
        return self.boundary.name if self.boundary is not None else ""

    def embedding_output_now(self):
        """The input embeddings' output in this forward, or None (not recorded, or freed)."""
        return self.embedding_output() if self.embedding_output is not None else None


@dataclass
class TaskRequest:
    """A training forward with labels whose task loss the fused linear cross-entropy computes."""

    labels: torch.Tensor | None
    shift_labels: torch.Tensor
    num_items_in_batch: object
    hidden: torch.Tensor | None = None
    autocast: tuple | None = None  # (device type, dtype) of an autocast the output head ran under (accelerate's AMP)


class StateHook:
    """The module hook ``factory(state, *args)`` makes, built on first call.

    A closure over the state would survive ``copy.deepcopy(model)`` unchanged (functions are not copied), so the
    copy would train the original's head, decoders and layers; this copies itself for the copy's state instead."""

    def __init__(self, factory, state, *args):
        self.factory, self.state, self.args, self._fn = factory, state, args, None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            self._fn = self.factory(self.state, *self.args)
        return self._fn(*args, **kwargs)

    def __getstate__(self):  # pickling (torch.save(model)): the built closure is rebuilt on first call
        return {**self.__dict__, "_fn": None}

    def __deepcopy__(self, memo):
        if id(self.state.causal_lm) not in memo:
            # a hooked submodule copied on its own (PEFT's modules_to_save copies of the head): it shares the
            # model's state, as a closure would, instead of carrying a hidden copy of the whole model
            return self
        state = copy.deepcopy(self.state, memo)  # the copy's state: its modules are the copied model's
        if id(self) in memo:  # copied meanwhile, through the state's own references to its hooks
            return memo[id(self)]
        twin = StateHook(self.factory, state, *copy.deepcopy(self.args, memo))
        memo[id(self)] = twin
        return twin


@dataclass
class PatchState:
    """Everything ``patch`` attached to one causal LM."""

    settings: LoptSettings
    causal_lm: nn.Module
    backbone: nn.Module
    layers: nn.ModuleList
    decoders: nn.ModuleList
    untied_embeddings: bool
    ignore_on_save: tuple[str, ...]
    handles: list = field(default_factory=list)
    replaying: bool = False
    current: PassState = field(default_factory=PassState)
    forward_signature: inspect.Signature | None = None
    task_request: TaskRequest | None = None
    fused_ce_impl: str | None = None  # resolved on the first training forward, again when fused_ce_key changes
    fused_ce_key: tuple | None = None  # what that decision depended on (see task_loss_hooks._fused_ce_inputs)
    notices: set = field(default_factory=set)
    bottom_fsdp2: bool | None = None  # whether FSDP2 shards the non-final blocks (checked on first use)
    saved_checkpoint_funcs: dict = field(default_factory=dict)  # layer -> its own checkpoint function, while swapped
    layer_hooks: dict = field(default_factory=dict)  # layer -> (our forward pre-hook, our forward hook or None)
    # layer index -> (the module hooked, [(kind, hook, handle)]): the hooks follow the module the layer list holds
    layer_registrations: dict = field(default_factory=dict)
    checked_ddp: object = None  # a weak reference to the DDP wrapper last found to hold the aux decoders
    checkpoint_bodies: list = field(default_factory=list)  # layers whose checkpointed call runs without our hooks
    embedding_hooks: dict = field(default_factory=dict)  # "input" / "head" -> (the module hooked, its hook's handle)
    decoders_in_optimizer: bool = False  # an optimiser that stepped holds every trainable decoder parameter
    optimizer_without_decoders: bool = False  # one stepped this model's parameters without them (optimizer_watch)

    def __getstate__(self):
        """Copies and pickles start with no forward in flight: the per-forward bookkeeping holds this forward's
        graph tensors (not deep-copyable) and weak references (not picklable)."""
        return {**self.__dict__, "current": PassState(), "task_request": None, "saved_checkpoint_funcs": {},
                "fused_ce_key": None, "decoders_in_optimizer": False, "optimizer_without_decoders": False,
                "checkpoint_bodies": []}

    def notice_once(self, key: str, message: str) -> None:
        if key not in self.notices:
            self.notices.add(key)
            warnings.warn(message, stacklevel=3)

    @property
    def block_starts(self) -> tuple[int, ...]:
        return (0, *self.settings.boundaries)

    @property
    def layers_name(self) -> str | None:
        """The backbone's attribute holding the layer stack (``layers``, ``h``), or None where it is deeper."""
        return next((name for name, child in self.backbone.named_children() if child is self.layers), None)

    def block_range(self, b: int) -> range:
        starts = (*self.block_starts, len(self.layers))
        return range(starts[b], starts[b + 1])

