"""What every boundary mode shares: the interface the hooks call (``BoundaryMode``), the per-boundary spec, the
block's reconstruction loss over the counted rows, and the stop-gradient hand-off.

Nothing in ``lopt_kernels.boundary`` knows about transformers' models: a block is a list of layer modules (what a
layer call may carry, a KV cache object, is read through ``lopt_kernels.hf_model``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..hf_model import is_kv_cache
from ..ops.reconstruction_loss import reconstruction_loss_and_grads


class BoundaryMode:
    """How the non-final blocks of one training forward learn; one object per forward, made when its first block
    starts. The hooks call it without knowing which mode it is, in this order: ``begin_block`` at a block's first
    layer, ``before_layer`` at each of its layers, ``end_block`` at its last, ``aux_loss`` on each block's aux term
    when the causal LM's forward ends, ``end_forward`` when the backbone's forward ends (or raises).

    A mode is one module of this package with one such class, listed in ``lopt_kernels.boundary.BOUNDARY_MODES``."""

    name = ""  # the ``mode=`` value that selects it
    # the block's local backward runs inside the forward (a torch.autograd.grad, which reentrant checkpointing refuses)
    backward_in_forward = False
    # the block's gradients are handed over by the first backward only (a second one through the output raises)
    one_backward = False

    def __init__(self, run):
        self.run = run  # the forward's PassState: embedding output, cache flags, inputs a block runs instead of
        self.tapes: dict = {}  # block -> what the mode keeps of its forward until its last layer

    def begin_block(self, block: int, layers: list, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> None:
        """The block's first layer is about to run on ``hidden`` (``rest``/``kwargs``: the call's other arguments)."""
        raise NotImplementedError

    def before_layer(self, block: int, layer, hidden: torch.Tensor, rest: tuple, kwargs: dict, first: bool):
        """A layer of the block is about to run: ``(args, kwargs)`` to call it with instead, or None (unchanged)."""
        return None

    def producer_of(self, block: int, value) -> tuple | None:
        """``(call index, place in its output)`` where an earlier layer of the running ``block`` returned ``value`` as
        an element of its output, for a mode whose rebuild passes such values on (activation-free); else None."""
        return None

    def end_block(self, block: int, spec: "BoundarySpec", y: torch.Tensor) -> tuple:
        """The block's last layer returned ``y``: ``(hand_off, aux_term)``, the next block's input (gradient
        stopped) and what ``aux_loss`` turns into the block's aux loss."""
        raise NotImplementedError

    def aux_loss(self, term, second_backward_message: str | None = None) -> torch.Tensor:
        """The block's aux loss in the caller's graph, from its ``end_block`` term; called when the causal LM's
        forward ends, after its task loss. ``second_backward_message``: what a second backward is told where the
        task loss also allows one (the fused cross-entropy)."""
        return term

    def end_forward(self) -> None:
        """The backbone's forward ended (or raised): let go of this forward's tensors."""
        self.tapes.clear()


@dataclass
class BoundarySpec:
    """Static configuration of one boundary, shared by every forward pass."""

    decoder: torch.nn.Module
    backend: str
    layerwise_rebuild: bool
    replay_guard: object  # object with a boolean attribute ``replaying``, set while a block is replayed
    row_mask: torch.Tensor | None = None  # flat bool: the rows the aux loss counts (None: all)
    # True: block gradients go straight into ``.grad`` as the rebuild produces them (no block-sized set
    # held); False: they return through the Function, so that each parameter's AccumulateGrad runs once
    # in the caller's backward, as DDP's reducer requires. (activation-free mode only)
    accumulate_into_grad: bool = True
    # eager mode under FSDP2: the local backward is an ordinary one whose gradients FSDP2 reduce-scatters, held sharded
    sharded_grads: bool = False
    # Called when a backward reaches the hand-off but the loss holds no aux term (the block stays untrained).
    on_missing_aux: Callable[[], None] | None = None


def zero3_partitioned(params) -> list[torch.Tensor]:
    """The DeepSpeed ZeRO-3 parameters among ``params`` whose data is partitioned away right now."""
    return [p for p in params if hasattr(p, "ds_id") and getattr(p.ds_status, "name", "") == "NOT_AVAILABLE"]


@contextmanager
def gathered(params, *, modifier_rank: int | None = None):
    """Whole parameters inside the block: DeepSpeed ZeRO-3 keeps only a partition of each outside the forward
    of the module that owns it, and the fused op (or a checkpoint) reads them directly. A collective on every
    rank (each runs the same boundaries); nothing to do without ZeRO-3. ``modifier_rank``: the rank whose changes
    made inside are partitioned back (None: read only)."""
    missing = zero3_partitioned(params)
    if not missing:
        yield
        return
    import deepspeed  # noqa: PLC0415 - only ZeRO-3 parameters get here

    with deepspeed.zero.GatheredParameters(missing, modifier_rank=modifier_rank):
        yield


def is_zero3(params) -> bool:
    """Whether DeepSpeed ZeRO-3 manages these parameters (it partitions them outside their modules' forward)."""
    return any(hasattr(p, "ds_id") for p in params)


def zero3_anchor() -> torch.Tensor:
    """A tiny leaf that requires grad, the one input through which a boundary Function that takes no ZeRO-3
    parameter (see ``accumulate_gathered``) is still reached by the caller's backward."""
    return torch.zeros((), requires_grad=True)


def accumulate_gathered(groups) -> None:
    """Under ZeRO-3, hand gradients computed off the autograd graph to their parameters. Each group of
    ``(param, grad)`` pairs is gathered whole and backpropagated through the parameters' own AccumulateGrad
    (a nested backward), where DeepSpeed's reduction hooks run, once per parameter and backward, as for any
    parameter a module used. A Function must not take partitioned parameters as inputs and return their
    gradients itself: its gradient edges would record the empty partition's shape (and AccumulateGrad would
    see a partitioned parameter)."""
    for group in groups:
        pairs = [(p, g) for p, g in group if g is not None and p.requires_grad]
        if not pairs:
            continue
        with gathered([p for p, _ in pairs]):
            with torch.enable_grad():
                views = [p.view_as(p) for p, _ in pairs]
            torch.autograd.backward(views, [g.to(p.dtype) for p, g in pairs])


def local_loss_and_grads(spec: BoundarySpec, y: torch.Tensor, x: torch.Tensor, *, grad_scale=1.0, compute_grads=True,
                         param_grad_scale: float = 1.0):
    """The block's reconstruction loss over the counted rows; grads as ``reconstruction_loss_and_grads``
    with ``grad_y`` shaped like ``y`` (zero on excluded rows). Over no rows the loss is 0 and every gradient
    is zero."""
    decoder = spec.decoder
    params = decoder.decoder_parameters()
    row_mask = None if spec.row_mask is None else spec.row_mask.to(y.device, non_blocking=True)
    y_dtype = y.dtype
    if x.dtype != y_dtype:
        # a block whose output dtype is not its input's (bf16 Mamba keeps its residual stream in fp32): compare the
        # two in the wider dtype (exact for both; the loss is fp32 anyway), ``grad_y`` back in ``y``'s dtype
        wide = torch.promote_types(y_dtype, x.dtype)
        y, x = y.to(wide), x.to(wide)
    with gathered(params):
        loss, grads = reconstruction_loss_and_grads(
            y, x, *params, eps=decoder.norm.eps, grad_scale=grad_scale, compute_grads=compute_grads,
            backend=spec.backend, row_mask=row_mask, param_grad_scale=param_grad_scale,
        )
    if grads is not None and grads[0].dtype != y_dtype:
        grads = (grads[0].to(y_dtype), *grads[1:])
    return loss, grads


def tensors_in(value, depth: int = 0):
    """Tensors in a layer call's argument: itself, inside tuples, lists and dicts, and in the attributes of a KV
    cache object (its layers' key/value tensors), a few levels deep."""
    if torch.is_tensor(value):
        yield value
        return
    if depth >= 4 or value is None or isinstance(value, (str, bytes, int, float, bool, torch.nn.Module)):
        return
    if isinstance(value, (tuple, list)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    elif hasattr(value, "__dict__") and (depth > 0 or is_kv_cache(value)):
        items = vars(value).values()
    else:
        return
    for item in items:
        yield from tensors_in(item, depth + 1)


def trainable_inputs(args, kwargs) -> list:
    """The tensors requiring grad among a layer call's arguments other than the hidden states (deduplicated)."""
    found = {}
    for value in (*args, *kwargs.values()):
        for t in tensors_in(value):
            if t.requires_grad:
                found.setdefault(id(t), t)
    return list(found.values())


def input_gradient_needed(x: torch.Tensor, placeholder_leaf: torch.Tensor | None) -> bool:
    """Whether the gradient of the first block's input reaches anything that learns or that the caller
    reads: a trainable parameter, or a leaf of the caller's (``inputs_embeds``). ``placeholder_leaf`` is
    the input embeddings' output when a hook only made it require grad (``enable_input_require_grads``,
    for reentrant checkpointing and PEFT): holding a gradient for it, and the leaf itself, would keep two
    activation-sized tensors alive through the top half's work for nothing."""
    if not x.requires_grad:
        return False
    if x.grad_fn is None:
        return x is not placeholder_leaf
    stack, seen = [x.grad_fn], set()
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or child in seen:
                continue
            seen.add(child)
            leaf = getattr(child, "variable", None)  # AccumulateGrad
            if leaf is not None:
                if leaf.requires_grad and leaf is not placeholder_leaf:
                    return True
            else:
                stack.append(child)
    return False


def trainable_outside_inputs(args, kwargs, placeholder_leaf: torch.Tensor | None) -> list:
    """The tensors requiring grad among a layer call's other arguments whose gradient reaches something that learns
    (not only ``placeholder_leaf``, the leaf ``enable_input_require_grads`` makes of the embedding output)."""
    return [t for t in trainable_inputs(args, kwargs) if input_gradient_needed(t, placeholder_leaf)]


def autocast_state(device_type: str):
    """``(device_type, True, dtype)`` of the autocast running on ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return (device_type, True, torch.get_autocast_dtype(device_type))
    except (TypeError, RuntimeError):  # pragma: no cover - older torch signatures
        pass
    return None


def hidden_of(output):
    """The hidden-state tensor of a layer's output (tensor or tuple whose first item is it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def block_params(layers, decoder) -> list[torch.Tensor]:
    """The trainable parameters a boundary takes as inputs: the block's layers', then the decoder's."""
    seen = set()
    params = []
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for p in decoder.decoder_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def as_hand_off(t: torch.Tensor) -> torch.Tensor:
    """The next block's input: no gradient flows back through it, but it requires grad, so that a
    reentrant-checkpointed top half still sees an input that requires grad."""
    return t if t.requires_grad else t.detach().requires_grad_(True)
