"""Eager boundary: the block learns during the forward, so nothing is recomputed.

A non-final block's gradient depends only on its own input and its local loss, so its backward can
run as soon as its forward ends. The block runs forward with its autograd graph (from a detached
copy of its input: stop-grad), the fused reconstruction-loss op returns the aux loss and its
gradients in one pass, and the block's local backward runs at once (``torch.autograd.grad``): the
graph and the block's activations are freed before the next block starts. Per-layer gradient
checkpointing applies as usual, so each layer runs forward and backward exactly as often as in
end-to-end training.

The caller's loss decides the weight of the aux term (``lambda_aux``, averaging over blocks,
accumulation division, ``num_items_in_batch``, a GradScaler...), which is only known when its
backward reaches the aux term. So the local gradients are held unscaled, and the aux term's Function
returns them multiplied by the gradient it receives: each parameter's AccumulateGrad runs once,
inside the caller's backward (DDP's reducer and gradient hooks see nothing unusual). That Function is
created when the causal LM's forward ends, after its task loss, so the caller's backward runs it first and
the held gradients never coexist with the task loss's or the top half's backward working set. The held
gradients live with the output's graph: a forward that is never backpropagated frees them with it.

Cost: one forward and one backward per layer (end-to-end's compute); memory: the block's trainable
parameters' gradients (tiny for LoRA) held from the block's forward to the caller's backward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import LoptPatchError
from ..hf_model import outputs_not_recorded
from .common import (BoundaryMode, BoundarySpec, accumulate_gathered, block_params, input_gradient_needed, is_zero3,
                     local_loss_and_grads, trainable_outside_inputs, zero3_anchor)

SECOND_BACKWARD_MESSAGE = (
    "lopt_kernels: a second backward reached an eager LoPT boundary, whose local gradients were handed over "
    "by the first one (mode='eager' trains the bottom blocks during the forward and holds their gradients for "
    "one backward). To backpropagate twice through one output (retain_graph=True), patch with "
    "mode='activation_free' or mode='stored'."
)


@dataclass
class EagerTape:
    """The block input as the caller passed it (``x``, with its graph for block 0) and the detached
    leaf the block actually runs on (``leaf``: it requires grad only where the input does); ``extras``: other
    trainable tensors the block's layers read from outside the bottom blocks (a PEFT prefix in the KV cache,
    per-layer inputs), whose gradients the local backward computes and hands over as well."""

    x: torch.Tensor
    leaf: torch.Tensor
    layers: list
    extras: list = field(default_factory=list)


def start_block(hidden: torch.Tensor, layers: list, *, input_needs_grad: bool) -> EagerTape:
    """The tape of a block of ``layers`` about to run on ``hidden``; the block runs on ``tape.leaf``, which
    requires grad only where the input's gradient is needed (block 0 with trainable embeddings; later
    blocks never: stop-grad between blocks)."""
    return EagerTape(x=hidden, leaf=hidden.detach().requires_grad_(input_needs_grad), layers=layers)


def _internal_scale(y_rows: int, hidden: int, dtype: torch.dtype | None = None) -> float:
    """A power of two near the number of counted elements: the local backward runs on the gradient of the
    *sum* of squared errors rather than the mean, so that fp16 activation gradients do not underflow
    (~1/N each for the mean); dividing by a power of two afterwards is exact. For fp16 at most 2^16 (a
    GradScaler's starting scale): a parameter gradient sums over every row, and a larger scale would overflow
    fp16's range (65504) for a channel with a steady residual."""
    scale = 2.0 ** math.floor(math.log2(max(y_rows * hidden, 1)))
    return min(scale, 2.0**16) if dtype == torch.float16 else scale


class _GradientSeed(torch.autograd.Function):
    """A scalar on ``y`` whose backward hands ``y`` the gradient kept in ``box`` and lets go of it: the local
    backward then frees ``grad_y`` (activation-sized) once the block's last node has used it, where
    ``torch.autograd.grad(y, ..., grad_y)`` would hold it to the end of the block's backward."""

    @staticmethod
    def forward(ctx, y, box):
        ctx.box = box
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        grad, ctx.box[0] = ctx.box[0], None
        return grad, None


@contextmanager
def local_backward(spec: BoundarySpec):
    """Around a block's local backward inside the forward: a checkpointed layer's recompute must neither re-enter
    the hooks (the replay guard) nor be recorded by transformers' output capture as if it were another layer
    (a MoE model's router logits, hidden states, attention maps: see ``outputs_not_recorded``)."""
    guard = spec.replay_guard
    guard.replaying = True
    try:
        with outputs_not_recorded():
            yield
    finally:
        guard.replaying = False


def run_local_backward(spec: BoundarySpec, tape: EagerTape, y: torch.Tensor):
    """The block's aux loss and its unscaled-by-the-caller local gradients, computed now.

    Returns ``(aux, params, held, internal_scale, unscaled)``: ``held[i]`` is the gradient of
    ``internal_scale * aux`` for ``params[i]`` (block layers), or of ``aux`` itself for ``i in unscaled`` (the
    decoder's, returned unscaled so that an fp16 cast cannot overflow), then one for each of ``tape.extras`` (None
    where unused), and ``held[-1]`` the one for the block input (or None)."""
    params = block_params(tape.layers, spec.decoder)
    rows = y.numel() // y.shape[-1]
    if spec.row_mask is not None and y.dtype == torch.float16:
        # fp16 only: the scale must follow the counted rows, or a mostly padded batch would overflow
        # (one host sync); bf16 and fp32 have the range for a scale from every row
        rows = max(int(spec.row_mask.sum()), 1)
    scale = _internal_scale(rows, y.shape[-1], y.dtype)
    # the decoder's gradients come back unscaled (in fp32 before their cast): only grad_y needs the scale
    aux, grads = local_loss_and_grads(spec, y.detach(), tape.leaf.detach(), grad_scale=scale, param_grad_scale=1.0 / scale)
    box, decoder_grads = [grads[0]], grads[1:]
    del grads
    by_id = {id(p): g for p, g in zip(spec.decoder.decoder_parameters(), decoder_grads)}
    decoder_ids = set(by_id)
    layer_params = [p for p in params if id(p) not in decoder_ids]
    wrt = layer_params + tape.extras + ([tape.leaf] if tape.leaf.requires_grad else [])
    grad_x, extra_grads = None, [None] * len(tape.extras)
    if spec.sharded_grads and wrt and y.requires_grad:
        sharded, local, grad_x = _fsdp2_local_backward(spec, tape, y, box, layer_params)
        by_id.update((id(p), g) for p, g in zip(sharded, local))
        # the held gradients belong to the sharded parameters, which the caller's backward accumulates into
        swap = {id(p): q for p, q in zip(layer_params, sharded)}
        params = [swap.get(id(p), p) for p in params]
    elif wrt and y.requires_grad:
        with local_backward(spec):
            local = torch.autograd.grad(_GradientSeed.apply(y, box), wrt, allow_unused=True)
        by_id.update((id(p), g) for p, g in zip(layer_params, local))
        extra_grads = list(local[len(layer_params) : len(layer_params) + len(tape.extras)])
        if tape.leaf.requires_grad:
            grad_x = local[-1]
    held = [by_id.get(id(p)) for p in params] + extra_grads + [grad_x]
    unscaled = frozenset(i for i, p in enumerate(params) if id(p) in decoder_ids)
    return aux, params, held, scale, unscaled


def _fsdp2_local_backward(spec: BoundarySpec, tape: EagerTape, y: torch.Tensor, box: list, layer_params: list):
    """The block's local backward under FSDP2: an ordinary backward, for which FSDP2 unshards the block's layers
    and from whose post-backward hooks it reduces their gradients into the sharded parameters' ``.grad`` (gradient
    sync and, under HSDP, the replicas' all-reduce forced on for the block: each micro-batch's local gradients are
    reduced once, now). The sharded gradients are then taken out of ``.grad`` (the ones accumulated before are put
    back). Returns ``(sharded, grads, grad_x)``: for each of ``layer_params`` its sharded parameter (itself where the
    layer was resharded after its forward; the unsharded module attribute otherwise) and that one's reduced
    gradient, and the block input's gradient (or None). FSDP2's end-of-backward callback is not queued (it would
    reshard the root's parameters in the middle of its forward): what it does for the block's groups is done here."""
    try:  # FSDP2's own state (torch 2.13's layout)
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState  # noqa: PLC0415

        states = [m._get_fsdp_state() for layer in tape.layers for m in layer.modules() if isinstance(m, FSDPModule)]
        groups = [g for state in states for g in state._fsdp_param_groups]
        ctx, comm = states[0]._state_ctx, states[0]._comm_ctx
        saved_sync = [(g.reduce_grads, g.all_reduce_grads) for g in groups]
        saved_queued = ctx.post_backward_final_callback_queued
        to_sharded = {}
        fsdp_params = [fp for g in groups for fp in g.fsdp_params]
        for fsdp_param in fsdp_params:
            to_sharded[id(fsdp_param.sharded_param)] = fsdp_param.sharded_param
            # the module attribute a layer's forward left: unsharded (not resharded after forward), or sharded over
            # a smaller group (``reshard_after_forward=<int>``)
            for attr in ("_unsharded_param", "_sharded_post_forward_param"):
                if getattr(fsdp_param, attr, None) is not None:
                    to_sharded[id(getattr(fsdp_param, attr))] = fsdp_param.sharded_param
        comm.post_forward_order, comm.reduce_scatter_states, groups[0]._post_forward_indices  # noqa: B018 - present, or refused below
    except (ImportError, AttributeError, IndexError) as exc:
        raise LoptPatchError(
            "mode='eager' under FSDP2 needs fully_shard on the bottom blocks' layers and FSDP2 internals that this "
            f"torch lays out otherwise ({type(exc).__name__}: {exc}); patch with mode='activation_free'."
        ) from exc
    sharded = [to_sharded.get(id(p), p) for p in layer_params]
    saved_grads, leaf_grad = [p.grad for p in sharded], tape.leaf.grad
    for p in sharded:
        p.grad = None
    # unsharded gradients FSDP2 accumulates across micro-batches with gradient sync off (an activation-free or stored
    # micro-batch before this one: mode="auto" picks by batch size) are the caller's, already weighted: set aside,
    # so that this reduction carries the block's local gradients only, and put back for FSDP2 to reduce when it syncs
    pending = []  # (FSDPParam, its accumulated unsharded gradient, its unsharded parameter or None, that one's .grad)
    for fp in fsdp_params:
        unsharded = getattr(fp, "_unsharded_param", None)
        pending.append((fp, fp.unsharded_accumulated_grad, unsharded, None if unsharded is None else unsharded.grad))
        fp.unsharded_accumulated_grad = None
        if unsharded is not None:
            unsharded.grad = None
    tape.leaf.grad = None
    for g in groups:
        g.reduce_grads = g.all_reduce_grads = True
    ctx.post_backward_final_callback_queued = True
    # No implicit backward prefetch inside the block: it would hold the next bottom layer all-gathered beside the
    # current one (one layer's unsharded weights, 3.2 MiB of LoRA eager's 36.9 MiB step peak in bench/fsdp2_modes.py;
    # 33.6 without, under activation-free's 33.0 + its held gradients). Each layer is all-gathered when its backward
    # starts, as in activation-free's rebuild.
    saved_indices = [g._post_forward_indices for g in groups]
    for g in groups:
        g._post_forward_indices = []
    try:
        with local_backward(spec):
            torch.autograd.backward(_GradientSeed.apply(y, box))
        for g in reversed(groups):
            if g._training_state != TrainingState.POST_BACKWARD:  # a layer whose inputs needed no gradient
                g.post_backward()
            g._training_state = TrainingState.IDLE
        for state in states:
            state._training_state = TrainingState.IDLE
        if y.device.type != "cpu":  # the sharded gradients are read on this stream later
            for rs in comm.reduce_scatter_states:
                if rs.event is not None:
                    torch.accelerator.current_stream(y.device).wait_event(rs.event)
        comm.reduce_scatter_states.clear()
        for g in groups:  # waits for the post-reduce work (division, cast into .grad), as the callback would
            g.finalize_backward()
        # the block's backward is done: the caller's backward must not prefetch (all-gather) its layers again
        done = {id(g) for g in groups}
        comm.post_forward_order[:] = [g for g in comm.post_forward_order if id(g) not in done]
    finally:
        for g, indices in zip(groups, saved_indices):
            g._post_forward_indices = indices
        ctx.post_backward_final_callback_queued = saved_queued
        for g, (reduce, all_reduce) in zip(groups, saved_sync):
            g.reduce_grads, g.all_reduce_grads = reduce, all_reduce
        for fp, acc, unsharded, grad in pending:
            fp.unsharded_accumulated_grad = acc
            if unsharded is not None:
                unsharded.grad = grad
    local = [p.grad for p in sharded]
    for p, g in zip(sharded, saved_grads):
        p.grad = g
    grad_x, tape.leaf.grad = tape.leaf.grad, leaf_grad
    return sharded, local, grad_x


@dataclass
class HeldGradients:
    """A block's local gradients, held from its forward until the caller's backward reaches its aux term."""

    spec: BoundarySpec
    grads: list | None  # per parameter (None where unused), per extra input, then the block input's (or None)
    internal_scale: float
    zero3_groups: tuple | None
    aux: torch.Tensor
    x: torch.Tensor
    params: list
    extras: list = field(default_factory=list)  # trainable tensors from outside the block that it read
    unscaled: frozenset = frozenset()  # indices of ``grads`` already free of the internal scale (the decoder's)
    handed_over: bool = False
    # what a second backward is told (the fused task loss, also one-backward, sets its own: it names both settings)
    second_backward_message: str = SECOND_BACKWARD_MESSAGE


class EagerHandOff(torch.autograd.Function):
    """The next block's input: ``y`` with the gradient stopped. Its backward only notices a caller's loss
    that reached the hand-off without the aux term (the block then stays untrained)."""

    @staticmethod
    def forward(ctx, held: HeldGradients, y, anchor):
        ctx.held = held
        return y.detach()

    @staticmethod
    def backward(ctx, grad):
        held = ctx.held
        if grad is not None and not held.handed_over and held.spec.on_missing_aux is not None:
            held.spec.on_missing_aux()
        return None, None, None


class EagerBoundary(torch.autograd.Function):
    """``aux = f(x, *params, *extras)``: the block's aux loss, whose backward returns the held local gradients
    times the gradient the aux output receives.

    It is applied when the causal LM's forward ends (``hand_over``), after every node of the top half and of
    the task loss the model computes (the fused cross-entropy included), so in the caller's backward it runs
    first, right after the loss: the held gradients become ``.grad`` before the task loss's and the top half's
    backward allocate their working sets, instead of stacking on top of them."""

    @staticmethod
    def forward(ctx, held: HeldGradients, aux, x, *params_and_extras):
        ctx.held = held
        ctx.set_materialize_grads(False)
        return aux.detach().clone()

    @staticmethod
    def backward(ctx, grad_aux):
        record, needs = ctx.held, ctx.needs_input_grad
        nones = (None,) * len(needs)
        if grad_aux is None:
            return nones
        held, record.grads = record.grads, None
        if held is None:
            raise RuntimeError(record.second_backward_message)
        record.handed_over = True
        scale = grad_aux.detach().float() / record.internal_scale
        own_scale = grad_aux.detach().float()  # for the gradients held unscaled
        *param_grads, grad_x = held
        n_extras = len(record.extras)
        param_grads, extra_grads = param_grads[: len(param_grads) - n_extras], param_grads[len(param_grads) - n_extras :]
        grad_x = grad_x * scale.to(grad_x.device) if needs[2] and grad_x is not None else None
        extra_needs = needs[len(needs) - n_extras :]
        extra_out = [g * scale.to(g.device) if need and g is not None else None
                     for g, need in zip(extra_grads, extra_needs)]
        if record.zero3_groups is not None:
            # ZeRO-3: the parameters are not inputs; their gradients go in gathered, one layer at a time
            params, groups = record.zero3_groups
            for i, g in {id(g): (i, g) for i, g in enumerate(param_grads) if g is not None}.values():
                g.mul_((own_scale if i in record.unscaled else scale).to(g.device))
            accumulate_gathered([[(params[i], param_grads[i]) for i in group] for group in groups])
            return (None, None, grad_x, *nones[3 : len(needs) - n_extras], *extra_out)
        out, scaled = [], set()
        for i, (g, need) in enumerate(zip(param_grads, needs[3 : len(needs) - n_extras])):
            if not need or g is None:
                out.append(None)
                continue
            if id(g) not in scaled:  # in place: the held tensor becomes the gradient (no second copy)
                g.mul_((own_scale if i in record.unscaled else scale).to(g.device))
                scaled.add(id(g))
            out.append(g)
        return (None, None, grad_x, *out, *extra_out)


def apply_boundary(spec: BoundarySpec, tape: EagerTape, y: torch.Tensor):
    """Run the block's local backward now. Returns ``(hand_off, held)``: the next block's input, and the
    held gradients, which ``hand_over`` turns into the aux term when the causal LM's forward ends."""
    aux, params, grads, scale, unscaled = run_local_backward(spec, tape, y)
    # the block input only where its gradient is handed back (block 0 with trainable embeddings): holding it
    # otherwise would keep the embedding output alive until the caller's backward
    x = tape.x if tape.leaf.requires_grad else tape.x.new_empty(0)
    zero3_groups = None
    if is_zero3(params):
        # DeepSpeed ZeRO-3 has partitioned the block's parameters by now: none is an input (accumulate_gathered)
        index = {id(p): i for i, p in enumerate(params)}
        owners = [*tape.layers, spec.decoder]
        groups = [[index.pop(id(p)) for p in owner.parameters() if id(p) in index] for owner in owners]
        zero3_groups, params = (params, groups), [zero3_anchor()]
    held = HeldGradients(spec, grads, scale, zero3_groups, aux, x, params, extras=list(tape.extras), unscaled=unscaled)
    # an empty leaf that requires grad puts the hand-off's Function in the caller's graph (y's own graph is
    # already freed by the local backward)
    anchor = torch.empty(0, device=y.device, requires_grad=True)
    return EagerHandOff.apply(held, y.detach(), anchor), held


def hand_over(held: HeldGradients) -> torch.Tensor:
    """The block's aux loss in the caller's graph (see EagerBoundary: call it when the causal LM's forward
    ends, after its task loss)."""
    return EagerBoundary.apply(held, held.aux, held.x, *held.params, *held.extras)


def learn_now(spec: BoundarySpec, tape: EagerTape, y: torch.Tensor, weight: float) -> torch.Tensor:
    """The block's local backward where the aux term's weight in the caller's loss is known in the forward (a
    pipeline stage): ``weight * aux``'s gradients go into ``.grad`` now (the block input's backpropagated on, where
    it needs one). Returns the block's aux loss."""
    if y.dtype == torch.float16:  # run_local_backward's path: gradients of a power-of-two-scaled sum, rescaled after
        aux, params, held, scale, unscaled = run_local_backward(spec, tape, y)
        *param_grads, grad_x = held
        if grad_x is not None:
            tape.x.backward(grad_x * (weight / scale))
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, param_grads)):
                if g is not None:
                    factor = weight if i in unscaled else weight / scale
                    p.grad = (g * factor).to(p.dtype) if p.grad is None else p.grad.add_(g, alpha=factor)
        return aux
    # the weight is known: straight into .grad, no second set of block gradients
    aux, grads = local_loss_and_grads(spec, y.detach(), tape.leaf.detach(), grad_scale=weight)
    grad_y, decoder_grads = grads[0], grads[1:]
    with torch.no_grad():
        for p, g in zip(spec.decoder.decoder_parameters(), decoder_grads):
            if p.requires_grad:
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g)
    if y.requires_grad:
        with local_backward(spec):
            torch.autograd.backward(y, grad_y)
        leaf = tape.leaf
        if leaf.requires_grad and leaf.grad is not None:  # block 0: on into the input embeddings
            grad_x, leaf.grad = leaf.grad, None
            tape.x.backward(grad_x)
    return aux


class EagerMode(BoundaryMode):
    """Eager mode in the hooks: each block runs on a detached leaf of its input and learns at its last layer; its
    held gradients become its aux loss when the causal LM's forward ends."""

    name = "eager"
    backward_in_forward = one_backward = True

    def __init__(self, run):
        super().__init__(run)
        # trainable tensors the first bottom layer read besides its hidden states (id of the tensor or of its base)
        self.outside_inputs: dict = {}

    def begin_block(self, block, layers, hidden, rest, kwargs):
        needs_grad = block == 0 and input_gradient_needed(hidden, self.run.embedding_output_now())
        tape = self.tapes[block] = start_block(hidden, layers, input_needs_grad=needs_grad)
        if block == 0:
            self.run.replaced_inputs[id(tape.leaf)] = hidden

    def before_layer(self, block, layer, hidden, rest, kwargs, first):
        tape = self.tapes[block]
        self._note_outside_inputs(tape, block == 0 and first, rest, kwargs)
        return ((tape.leaf, *rest), kwargs) if first else None

    def _note_outside_inputs(self, tape: EagerTape, first_call: bool, rest: tuple, kwargs: dict) -> None:
        """The trainable tensors a layer reads besides its hidden states that come from outside the bottom blocks (a
        PEFT prefix in the KV cache, per-layer inputs), so that the local backward hands their gradients over too.
        Outside means present at the first bottom layer's call, or a view of such a tensor (a per-layer slice):
        cache entries the bottom layers wrote since are their own local graph's."""
        found = trainable_outside_inputs(rest, kwargs, self.run.embedding_output_now())
        if first_call:
            self.outside_inputs = {id(t if t._base is None else t._base): t for t in found}
        known = {id(t) for t in tape.extras}
        for t in found:
            if id(t if t._base is None else t._base) in self.outside_inputs and id(t) not in known:
                tape.extras.append(t)
                known.add(id(t))

    def end_block(self, block, spec, y):
        return apply_boundary(spec, self.tapes.pop(block), y)  # the term: held gradients, handed over at the end

    def aux_loss(self, term, second_backward_message=None):
        if second_backward_message is not None:  # its backward now runs before the fused task loss's
            term.second_backward_message = second_backward_message
        return hand_over(term)

    def end_forward(self):
        super().end_forward()
        self.outside_inputs = {}  # tensors of this forward's graph: the held gradients keep what the backward needs
