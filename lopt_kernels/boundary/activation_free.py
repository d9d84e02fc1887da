"""Activation-free boundary: the block runs forward without an autograd graph and is rebuilt in the
caller's backward.

Only the block input ``x`` and the arguments of each layer call (the "tape") are kept. The boundary
Function returns the block output unchanged (the hand-off to the next block, which receives no
gradient back: stop-grad) and the block's reconstruction loss. When autograd reaches the boundary
during the caller's ordinary ``loss.backward()``, the gradient arriving at the reconstruction-loss
output is exactly the weight that the caller's loss gives the aux term (``lambda_aux``, averaging over
blocks, accumulation division, ``num_items_in_batch`` weighting, a GradScaler's scale...). The backward
rebuilds the block from ``x``, backpropagates that scaled local loss into the block's parameters, the
aux decoder and (for block 0) the embeddings, and returns nothing to the block above.

Cost: every layer of the block runs forward twice (three times with gradient checkpointing); memory:
nothing of the block but its input lives until the caller's backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LoptPatchError
from ..hf_model import cache_in, without_cache
from .common import (BoundaryMode, BoundarySpec, accumulate_gathered, as_hand_off, autocast_state, block_params,
                     hidden_of, is_zero3, local_loss_and_grads, trainable, zero3_anchor)

PREFILLED_CACHE_MESSAGE = (
    "lopt_kernels: a training forward got a KV cache that already holds {n} positions, but mode='activation_free' "
    "rebuilds the bottom blocks in the backward and cannot replay them against the cache as it was. Pass "
    "use_cache=False (and no cache) in training, or patch with mode='eager' or mode='stored', which run every "
    "layer once and honour the cache."
)


@dataclass
class LayerCall:
    """One recorded layer call: everything but the hidden states, plus the RNG state it ran under."""

    layer: torch.nn.Module
    args: tuple
    kwargs: dict
    cpu_rng: torch.Tensor | None = None
    device_rng: torch.Tensor | None = None
    rng_device: torch.device | None = None  # the CUDA device ``device_rng`` was captured from
    # arguments an earlier layer of the block returned besides its hidden states (ZAYA's router states): (index in
    # args or name in kwargs, the producing call's index in the tape, the place in its output); the rebuild passes
    # the rebuilt tensor there, so that its aux-loss gradient reaches the earlier layer
    threads: list = field(default_factory=list)


@dataclass
class BlockTape:
    """What an activation-free block keeps from its forward: its input and its layer calls."""

    x: torch.Tensor | None = None
    calls: list[LayerCall] = field(default_factory=list)
    autocast: tuple | None = None  # (device_type, enabled, dtype)


def _run_directly(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _call_layer(call: LayerCall, hidden: torch.Tensor, outputs: list | None = None):
    """The layer's hidden states on ``hidden``; with ``outputs`` (the block's earlier calls' whole outputs), its whole
    output, the earlier layers' rebuilt values passed where it read them."""
    layer = call.layer
    args, kwargs = call.args, call.kwargs
    if call.threads:
        args, kwargs = list(args), dict(kwargs)
        for where, producer, k in call.threads:
            value = outputs[producer][k]
            if isinstance(where, int):
                args[where] = value
            else:
                kwargs[where] = value
    # Bypass the layer's checkpointing, transformers' own or torch's checkpoint_wrapper (accelerate's FSDP2
    # activation checkpointing): the rebuild already is the recomputation.
    saved_flag = getattr(layer, "gradient_checkpointing", None)
    wrapper_fn = layer.__dict__.get("checkpoint_fn") if hasattr(layer, "_checkpoint_wrapped_module") else None
    if saved_flag:
        layer.gradient_checkpointing = False
    if wrapper_fn is not None:
        layer.checkpoint_fn = _run_directly
    try:
        output = layer(hidden, *args, **kwargs)
        return output if outputs is not None else hidden_of(output)
    finally:
        if saved_flag:
            layer.gradient_checkpointing = saved_flag
        if wrapper_fn is not None:
            layer.checkpoint_fn = wrapper_fn


class _ReplayContext:
    """Restores grad mode, autocast and RNG state around the replay of one layer."""

    def __init__(self, tape: BlockTape, call: LayerCall, grad: bool):
        self.tape, self.call, self.grad = tape, call, grad

    def __enter__(self):
        self._stack = []
        grad_ctx = torch.enable_grad() if self.grad else torch.no_grad()
        grad_ctx.__enter__()
        self._stack.append(grad_ctx)
        if self.tape.autocast is not None:
            device_type, enabled, dtype = self.tape.autocast
            ac = torch.autocast(device_type, dtype=dtype, enabled=enabled)
            ac.__enter__()
            self._stack.append(ac)
        if self.call.cpu_rng is not None:
            # The device state goes back to the device it was captured from (the block's, which need not
            # be the current device), and only that device's state is saved and restored around the call.
            devices = []
            if self.call.device_rng is not None:
                index = self.call.rng_device.index if self.call.rng_device is not None else None
                devices = [index if index is not None else torch.cuda.current_device()]
            fork = torch.random.fork_rng(devices=devices)
            fork.__enter__()
            self._stack.append(fork)
            torch.set_rng_state(self.call.cpu_rng)
            if self.call.device_rng is not None:
                torch.cuda.set_rng_state(self.call.device_rng, devices[0])
        return self

    def __exit__(self, *exc):
        while self._stack:
            self._stack.pop().__exit__(*exc)
        return False


def _grads_into(store: dict, params: list[torch.Tensor], grads) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            store[id(p)] = g if id(p) not in store else store[id(p)] + g


def _local_backward(output, grad, layer_in, params, store: dict | None):
    """Backpropagate ``grad`` from ``output`` to ``layer_in`` and ``params``. Parameter gradients go into
    ``store`` or, when it is None, straight into ``.grad``. Returns the gradient of ``layer_in``."""
    wrt = ([layer_in] if layer_in is not None else []) + params
    if not wrt or not output.requires_grad:
        return None
    if store is None:
        torch.autograd.backward(output, grad, inputs=wrt)
        if layer_in is None:
            return None
        grad_in, layer_in.grad = layer_in.grad, None
        return grad_in
    grads = torch.autograd.grad(output, wrt, grad, allow_unused=True)
    grad_in = grads[0] if layer_in is not None else None
    _grads_into(store, params, grads[1:] if layer_in is not None else grads)
    return grad_in


def engine_accumulates(params) -> bool:
    """Whether the running backward will execute every one of ``params``' AccumulateGrad nodes, i.e. write
    their ``.grad``. Not under ``torch.autograd.grad`` (which returns gradients instead) nor for a
    parameter left out of ``backward(inputs=...)``: there the block's gradients must return through the
    boundary Function, or the rebuild would write ``.grad`` the caller did not ask for."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:  # pragma: no cover - a torch without it: always the exact path
        return False
    try:
        return all(will_execute(torch.autograd.graph.get_gradient_edge(p).node) for p in params)
    except RuntimeError:  # torch.autograd.grad refuses the question for its inputs: they are not accumulated
        return False


def rebuild_and_backward(spec: BoundarySpec, tape: BlockTape, x: torch.Tensor, grad_scale, x_needs_grad: bool,
                         into_grad: bool | None = None):
    """Rebuild the block from its input ``x`` and backpropagate ``grad_scale * aux``.

    Returns ``(grad_x, {id(param): grad})``: the decoder's parameter gradients, and the block's unless
    ``into_grad`` (default ``spec.accumulate_into_grad``) sent those straight into ``.grad``."""
    guard = spec.replay_guard
    guard.replaying = True
    store: dict[int, torch.Tensor] = {}
    if into_grad is None:
        into_grad = spec.accumulate_into_grad
    block_store = None if into_grad else store
    decoder_params = list(spec.decoder.decoder_parameters())
    try:
        x = x.detach()
        threaded = any(call.threads for call in tape.calls)
        if spec.layerwise_rebuild and not threaded:
            # Checkpoint every layer input (no graph), then walk back one layer at a time.
            inputs = []
            hidden = x
            for call in tape.calls:
                inputs.append(hidden)
                with _ReplayContext(tape, call, grad=False):
                    hidden = _call_layer(call, hidden)
            _, grads = local_loss_and_grads(spec, hidden, x, grad_scale=grad_scale)
            grad_hidden = grads[0]
            _grads_into(store, decoder_params, grads[1:])
            del hidden, grads
            for i in range(len(tape.calls) - 1, -1, -1):
                call = tape.calls[i]
                needs_input = i > 0 or x_needs_grad
                layer_in = inputs[i].detach().requires_grad_(needs_input)
                inputs[i] = None
                with _ReplayContext(tape, call, grad=True):
                    out = _call_layer(call, layer_in)
                grad_hidden = _local_backward(out, grad_hidden, layer_in if needs_input else None,
                                              trainable(call.layer), block_store)
                del out
                if grad_hidden is None:
                    break
            grad_x = grad_hidden if x_needs_grad else None
        else:
            # Rebuild the whole block with its graph, then one backward through it.
            # (also where a layer reads what an earlier one returned besides its hidden states: one graph carries
            # both, where a layer-by-layer walk would carry the hidden states' gradient only)
            layer_in = x.requires_grad_(x_needs_grad)
            hidden = layer_in
            outputs = [] if threaded else None
            for call in tape.calls:
                with _ReplayContext(tape, call, grad=True):
                    output = _call_layer(call, hidden, outputs)
                if outputs is not None:
                    outputs.append(output)
                    output = hidden_of(output)
                hidden = output
            del outputs
            _, grads = local_loss_and_grads(spec, hidden.detach(), x, grad_scale=grad_scale)
            _grads_into(store, decoder_params, grads[1:])
            block_params = [p for call in tape.calls for p in trainable(call.layer)]
            grad_x = _local_backward(hidden, grads[0], layer_in if x_needs_grad else None, block_params,
                                     block_store)
    finally:
        guard.replaying = False
    return grad_x, store


class ActivationFreeBoundary(torch.autograd.Function):
    """``(hand_off, aux) = f(y, x, *params)``: hand-off is ``y`` with the gradient stopped, ``aux`` the
    block's reconstruction loss; the backward rebuilds the block (see module docstring)."""

    @staticmethod
    def forward(ctx, spec: BoundarySpec, tape: BlockTape, y, x, *params):
        aux, _ = local_loss_and_grads(spec, y, x.detach(), compute_grads=False)
        # The block input goes through save_for_backward so that autograd frees it after the
        # backward (unless retain_graph); the tape keeps only the layers' call arguments.
        ctx.save_for_backward(x)
        tape.x = None
        ctx.spec, ctx.tape = spec, tape
        ctx.params = params
        # ZeRO-3: params is an anchor alone (see apply_boundary)
        ctx.zero3 = is_zero3(block_params([call.layer for call in tape.calls], spec.decoder))
        ctx.set_materialize_grads(False)
        return y.detach(), aux

    @staticmethod
    def backward(ctx, grad_hand_off, grad_aux):
        spec, tape = ctx.spec, ctx.tape
        (x,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x_needs_grad = bool(needs[3])
        if grad_aux is None:
            # The caller's loss does not contain this block's aux term: nothing trains the block.
            if grad_hand_off is not None and spec.on_missing_aux is not None:
                spec.on_missing_aux()
            return (None,) * len(needs)
        decoder_params = spec.decoder.decoder_parameters()
        if ctx.zero3:
            # ZeRO-3: the rebuild's own backward accumulates the block's gradients (DeepSpeed gathers each layer's
            # parameters for it and reduces from their AccumulateGrad); the decoder's go in gathered.
            grad_x, grads_by_id = rebuild_and_backward(spec, tape, x, grad_aux, x_needs_grad, True)
            accumulate_gathered([[(p, grads_by_id.get(id(p))) for p in decoder_params]])
            return (None, None, None, grad_x, *(None for _ in needs[4:]))
        decoder_ids = {id(p) for p in decoder_params}
        into_grad = spec.accumulate_into_grad and engine_accumulates([p for p in ctx.params if id(p) not in decoder_ids])
        grad_x, grads_by_id = rebuild_and_backward(spec, tape, x, grad_aux, x_needs_grad, into_grad)
        param_grads = [grads_by_id.get(id(p)) if need else None for p, need in zip(ctx.params, needs[4:])]
        return (None, None, None, grad_x, *param_grads)


def apply_boundary(spec: BoundarySpec, tape: BlockTape, y: torch.Tensor, x: torch.Tensor):
    """Activation-free boundary over a block whose forward ran without a graph. Returns ``(hand_off, aux)``.

    Pass ``x`` with its graph only where the block input should receive gradient (block 0: the
    embeddings); later blocks take ``x.detach()`` (stop-grad between blocks)."""
    params = block_params([call.layer for call in tape.calls], spec.decoder)
    if is_zero3(params):
        # DeepSpeed ZeRO-3 has partitioned them by now: no parameter is an input (see accumulate_gathered)
        params = [zero3_anchor()]
    hand_off, aux = ActivationFreeBoundary.apply(spec, tape, y, x, *params)
    return as_hand_off(hand_off), aux


class ActivationFreeMode(BoundaryMode):
    """Activation-free mode in the hooks: each block runs without a graph, its layer calls recorded for the rebuild."""

    name = "activation_free"

    def __init__(self, run):
        super().__init__(run)
        self.grad_was_enabled: bool | None = None  # grad mode before a block turned it off, until its last layer

    def begin_block(self, block, layers, hidden, rest, kwargs):
        if block == 0:  # before any layer wrote this forward
            cache = cache_in(rest, kwargs)
            if cache is not None and cache.get_seq_length() > 0:
                raise LoptPatchError(PREFILLED_CACHE_MESSAGE.format(n=cache.get_seq_length()))
        self.tapes[block] = BlockTape(x=hidden, autocast=autocast_state(hidden.device.type))
        self.grad_was_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def before_layer(self, block, layer, hidden, rest, kwargs, first):
        # The replay neither reads nor writes the cache: it was empty before this forward (prefilled ones are
        # refused above), so a layer without one computes what it computed with it.
        run = self.run
        replay_rest, replay_kwargs = without_cache(rest, kwargs)
        if not run.cache_requested:
            run.cache_skipped = run.cache_skipped or cache_in(rest, kwargs) is not None
            rest, kwargs = replay_rest, replay_kwargs
        call = LayerCall(layer, replay_rest, replay_kwargs, cpu_rng=torch.get_rng_state(),
                         threads=self._threads(block, replay_rest, replay_kwargs))
        if hidden.device.type == "cuda":
            call.device_rng, call.rng_device = torch.cuda.get_rng_state(hidden.device), hidden.device
        self.tapes[block].calls.append(call)
        return (hidden, *rest), kwargs

    def producer_of(self, block, value):
        origin = self.run.side_outputs.get(id(value))
        if origin is None or origin[2] is None:  # not returned, or inside a container of the output
            return None
        calls = self.tapes[block].calls
        producer = next((i for i in range(len(calls) - 1, -1, -1) if calls[i].layer is origin[1]), None)
        return None if producer is None else (producer, origin[2])

    def _threads(self, block, rest, kwargs) -> list:
        """Where this layer call reads a value an earlier layer of the block returned (see ``LayerCall.threads``)."""
        if not self.run.side_outputs:  # the common case: the layers return their hidden states alone
            return []
        found = ((where, self.producer_of(block, value)) for where, value in (*enumerate(rest), *kwargs.items())
                 if torch.is_tensor(value))
        return [(where, *producer) for where, producer in found if producer is not None]

    def end_block(self, block, spec, y):
        self._restore_grad_mode()
        tape = self.tapes.pop(block)
        x = tape.x if block == 0 else tape.x.detach()
        return apply_boundary(spec, tape, y, x)

    def end_forward(self):
        self._restore_grad_mode()  # an exception escaped a block
        super().end_forward()

    def _restore_grad_mode(self):
        if self.grad_was_enabled is not None:
            torch.set_grad_enabled(self.grad_was_enabled)
            self.grad_was_enabled = None
