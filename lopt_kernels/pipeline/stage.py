"""A LoPT pipeline stage: this rank's block, built and read alone; one micro-batch's forward, send and local
backward."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..aux_decoder import AuxDecoder
from ..boundary import eager
from ..boundary.common import BoundarySpec, hidden_of
from ..discovery import AUX_DECODERS_ATTR, LoptPatchError, find_layer_stack, text_config
from ..hf_model import PER_TOKEN_INPUTS, HooksOutsideCheckpoint, LayerCallSite, layer_call_site
from ..ops import linear_cross_entropy as lce
from ..task_loss_hooks import fused_ce_choice, head_task_loss, item_share, label_count
from .checkpoint import SHARD_PREFIX, model_key
from .placement import StagePlan, check_ranks_agree


@contextlib.contextmanager
def _timed(spans: list, kind: str):
    """Append ``(kind, start, end)`` wall-clock times of the block to ``spans``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        spans.append((kind, start, time.perf_counter()))


class _StageDone(Exception):
    """Raised by the last layer of a non-final stage: nothing after it runs on this rank."""


@dataclass
class MessageCount:
    """Messages this rank sent and received, by the peer's side (a message: one micro-batch's activations, with the
    header that describes them, or one step's aux-loss record): every send and receive of a stage goes through
    :meth:`PipelineStage.send` / :meth:`PipelineStage.receive`, which count them here (a test asserts that
    nothing is sent to an earlier rank or received from a later one)."""

    downstream_sends: int = 0  # to a later rank
    upstream_receives: int = 0  # from an earlier rank (the downstream flow, seen from here)
    upstream_sends: int = 0  # to an earlier rank: a gradient message, which LoPT never needs
    downstream_receives: int = 0  # from a later rank

    def note(self, rank: int, peer: int, *, sending: bool) -> None:
        if sending:
            self.downstream_sends += peer > rank
            self.upstream_sends += peer < rank
        else:
            self.upstream_receives += peer < rank
            self.downstream_receives += peer > rank


@dataclass
class StageTimeline:
    """Wall-clock spans of the last step on this rank: (kind, start, end), kind in forward / local_backward /
    backward / send / receive / step."""

    spans: list = field(default_factory=list)


# an activation message's header: one row per value (present, dtype, number of dimensions, up to 8 sizes)
_HEADER_WIDTH = 11
_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool)


def _header(values, device) -> torch.Tensor:
    rows = []
    for v in values:
        if v is None:
            rows.append([0] * _HEADER_WIDTH)
            continue
        if v.dim() > _HEADER_WIDTH - 3 or v.dtype not in _WIRE_DTYPES:
            raise LoptPatchError(f"a pipeline stage cannot send a {v.dtype} tensor of {v.dim()} dimensions downstream "
                                 f"(at most {_HEADER_WIDTH - 3}, of {', '.join(map(str, _WIRE_DTYPES))})")
        rows.append([1, _WIRE_DTYPES.index(v.dtype), v.dim(), *v.shape, *[0] * (_HEADER_WIDTH - 3 - v.dim())])
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _argument_name(module: nn.Module, position: int) -> str:
    """The name of a layer forward's positional parameter ``position`` (a handed-on value the backbone passed by
    position, where this call has fewer positional arguments)."""
    import inspect  # noqa: PLC0415

    return list(inspect.signature(module.forward).parameters)[position]


def _argument(module: nn.Module, args: tuple, kwargs: dict, where):
    """The value of a layer call's argument ``where`` (a position or a keyword), None if not passed."""
    if isinstance(where, int):
        if where < len(args):
            return args[where]
        where = _argument_name(module, where)
    return kwargs.get(where)


def _set_argument(module: nn.Module, args: list, kwargs: dict, where, value) -> None:
    """Set a layer call's argument ``where`` (a position or a keyword) to ``value``."""
    if isinstance(where, int) and where < len(args):
        args[where] = value
    else:
        kwargs[where if isinstance(where, str) else _argument_name(module, where)] = value


class _StandIns:
    """While open, the earlier stages' layers (on the meta device on this rank) return their input hidden states,
    in their output's structure, instead of running: the backbone's loop still iterates every layer, so each layer
    and whatever the loop computes per layer (a mask by the layer's type, ``i in config.index_layers``) read their
    own index; the stage's first layer then runs on what the previous stage sent."""

    def __init__(self, layers, call_site: LayerCallSite):
        self._saved = [(layer, layer.__dict__.get("forward")) for layer in layers]

        def stand_in(*args, **kwargs):
            return call_site.stand_in_output(args[0] if args else kwargs["hidden_states"])

        for layer in layers:
            layer.forward = stand_in

    def close(self) -> None:
        for layer, forward in self._saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        self._saved = []


def _fused_ce_impl(lm) -> str | None:
    """The last stage's fused linear cross-entropy, chosen as ``patch`` chooses it; None (the model's own loss)
    also for mixture-of-experts models, whose router term spans every stage's layers."""
    if hasattr(text_config(lm), "output_router_logits"):
        return None
    return fused_ce_choice(lm, "auto", lm.get_output_embeddings().weight.device)[0]


def _stage_random_state(device: torch.device) -> tuple:
    """(CPU, CUDA or None) generator states of a stream for this process's stage: seeded from the process's seed
    (``torch.initial_seed()``, what ``torch.manual_seed`` set) and its global rank, so that identically seeded
    ranks draw independent dropout masks and a relaunch with the same seeds draws the same ones."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    seed = (torch.initial_seed() * 1_000_003 + 7_919 * (rank + 1)) % (2**63 - 1)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None


def _error_text(exc: Exception) -> str:
    """What the other ranks are told of a rank's failure to place the model."""
    return str(exc) if isinstance(exc, LoptPatchError) else f"{type(exc).__name__}: {exc}"


BATCH_KEYS = frozenset({"input_ids", "attention_mask", "labels", *PER_TOKEN_INPUTS})


class PipelineStage:
    """This rank's part of a LoPT pipeline: its block's layers, its aux decoder (every stage but the last),
    the input embeddings (rank 0) and the final norm and head (last rank)."""

    def __init__(self, lm: nn.Module, *, rank: int, world: int, ranges, lambda_aux: float, decoder: AuxDecoder | None,
                 group=None, backend: str = "auto", adapter: str | None = None, first_rank_modules=None,
                 aux_mask: str = "all", writes_inputs_embeds: bool = False, aliases=None):
        self.lm, self.rank, self.world, self.group, self.adapter = lm, rank, world, group, adapter
        self.ranges, self.lambda_aux, self.decoder, self.backend = ranges, float(lambda_aux), decoder, backend
        self.aux_mask = aux_mask
        self.backbone, self.layers_attr, self.all_layers = find_layer_stack(lm)
        self._layers_prefix = next(n for n, m in lm.named_modules() if m is self.all_layers)
        input_embeddings = next(n for n, m in lm.named_modules() if m is lm.get_input_embeddings())
        # modules outside the layer stack that the first rank runs (see placement.modules_before_layers)
        self.first_rank_modules = list(first_rank_modules or [input_embeddings])
        first, end = ranges[rank]
        self.own_layers = nn.ModuleList(self.all_layers[first:end])
        # the backbone iterates every layer, so that it reads each layer's settings by its own index; the earlier
        # stages' layers (on the meta device here) stand in, returning their input (see _StandIns)
        self.call_site = layer_call_site(type(self.backbone), self.layers_attr) or LayerCallSite()
        self._earlier_layers = list(self.all_layers[:first])
        self.is_first, self.is_last = rank == 0, rank == world - 1
        self.messages = MessageCount()
        self.timeline = StageTimeline()
        self.replaying = False  # set while a checkpointed layer recomputes inside the local backward
        self._pending_sends: list = []
        # what the model's forward takes as inputs_embeds (OPT-350m projects a narrower embedding in)
        self.embedding_dim = lm.get_input_embeddings().weight.shape[-1]
        # the forward writes into inputs_embeds (CTRL scales them in place): a tensor of its own, not a broadcast view
        self.writes_inputs_embeds = writes_inputs_embeds
        # tensor names tied to another tensor of the model, which the checkpoint stored under the other name
        self.aliases = set(aliases or ())
        self.fused_ce = _fused_ce_impl(lm) if self.is_last else None
        self.dtype = next(p.dtype for p in self.own_layers.parameters())
        self.device = next(p.device for p in self.own_layers.parameters())
        self._random_state = _stage_random_state(self.device)

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str, *, boundaries=None, lambda_aux: float = 10.0,
                        dtype: torch.dtype = torch.float32, device="cpu", group=None, backend: str = "auto",
                        aux_decoders: str | None = None, attn_implementation: str | None = None,
                        gradient_checkpointing: bool = False, adapter: str | None = None, aux_mask: str = "all"):
        """Build this rank's part of the model saved in ``model_dir`` (``save_pretrained`` output), reading only
        its own tensors. ``aux_decoders``: a directory holding ``lopt_aux_decoders.safetensors`` to start the
        decoders from (default: ``model_dir``'s, if present; otherwise a fresh, seeded initialisation).
        ``adapter``: a PEFT LoRA adapter directory (``save_pretrained`` of a PeftModel) to train instead of the
        full model: the base weights are frozen, each rank trains its layers' LoRA weights and its decoder.
        ``aux_mask``: as ``patch``'s ("tokens": padding positions, from the batch's attention mask, are left out
        of the aux loss). Every check runs before the ranks' agreement barrier, so that a model this cannot place
        is refused with the same ``LoptPatchError`` on every rank."""
        if not dist.is_initialized():
            raise LoptPatchError("PipelineStage needs torch.distributed initialised (launch with torchrun)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        plan, error = None, None
        # the caller's random state is left as it was: ranks that build different parts must draw alike after
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            try:
                plan = StagePlan.build(model_dir, rank, world, boundaries=boundaries, dtype=dtype, device=device,
                                       attn_implementation=attn_implementation, adapter=adapter,
                                       aux_decoders=aux_decoders, aux_mask=aux_mask)
            except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, or they wait forever
                error = _error_text(exc)
            mine = {"dtype": str(dtype)} if plan is None else plan.agreement()
            check_ranks_agree(group, world, mine, error)
            try:  # reading can still fail on one rank (a tensor of the wrong shape, a decoder file for fewer stages)
                lm = plan.load()
                decoder = plan.decoder() if rank != world - 1 else None
            except Exception as exc:  # noqa: BLE001 - as above: every rank raises, none waits on a dead peer
                error = _error_text(exc)
            check_ranks_agree(group, world, {}, error)
        lm.train()
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable({"use_reentrant": False})  # the local backward is an autograd.grad
        stage = cls(lm, rank=rank, world=world, ranges=plan.ranges, lambda_aux=lambda_aux, decoder=decoder,
                    group=group, backend=backend, adapter=adapter, first_rank_modules=plan.first_rank_modules,
                    aux_mask=aux_mask, writes_inputs_embeds=plan.writes_inputs_embeds, aliases=plan.aliases)
        # a stage with nothing to train cannot build an optimiser, and the others would wait on it forever
        first, end = plan.ranges[rank]
        error = None if stage.parameters_to_train() else (
            f"its stage (layers {first}-{end - 1}) has no trainable tensor: the adapter adapts none of its modules "
            "and it holds no aux decoder. Choose boundaries that give every stage an adapted module, or widen the "
            "adapter's target_modules.")
        check_ranks_agree(group, world, {}, error)
        return stage

    def owns(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether this rank trains and saves the model tensor ``name``: its layers'; on rank 0, the input
        embeddings and every module outside the layer stack that runs before the first layer (learned positions,
        an embedding norm); on the last rank everything else outside the stack (final norm, head). Other ranks
        may hold a copy they only run, never one they train."""
        if tensor.is_meta:
            return False
        prefix = self._layers_prefix + "."
        if name.startswith(prefix):
            first, end = self.ranges[self.rank]
            return first <= int(name[len(prefix):].split(".")[0]) < end
        if any(name == module or name.startswith(module + ".") for module in self.first_rank_modules):
            return self.is_first
        return self.is_last

    def parameters_to_train(self) -> list[torch.Tensor]:
        """This rank's trainable parameters (its layers; embeddings on rank 0; norm and head on the last rank;
        its aux decoder): build this rank's optimiser from them."""
        params = [p for n, p in self.lm.named_parameters() if p.requires_grad and self.owns(n, p)]
        if self.decoder is not None:
            params += list(self.decoder.parameters())
        return params

    # one micro-batch ------------------------------------------------------------------------------
    def _run_backbone(self, batch: dict, received: torch.Tensor | None, num_items=None):
        """This stage's layers on ``received`` (or on the embeddings, rank 0), through the model's own forward so
        that masks and position embeddings are the model's; returns (stage input, stage output or the model
        output on the last rank)."""
        captured = {}
        own, last_layer = list(self.own_layers), self.own_layers[-1]

        bodies = []  # layers whose checkpointed call runs (see HooksOutsideCheckpoint): the hooks stand aside

        # on every layer of the stage, acting at the first that runs: a model may skip a layer in some forwards
        # (Mllama's cross-attention layers without images), the stage's first among them
        def pre(module, args, kwargs):
            if self.replaying or module in bodies or "x" in captured:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            x = hidden if received is None else received[0]
            # the block runs from a detached copy (stop-grad); on rank 0 the embeddings' gradient goes through it
            leaf = x.detach().requires_grad_(self.is_first and x.requires_grad)
            captured["x"], captured["leaf"] = x, leaf
            args, kwargs = list(args), dict(kwargs)
            if args:
                args[0] = leaf
            else:
                kwargs["hidden_states"] = leaf
            if received is not None:  # what the previous stage's last layer handed on besides its hidden states
                for (_, _, where), value in zip(self.call_site.carried, received[1:]):
                    _set_argument(module, args, kwargs, where, value)
            return tuple(args), kwargs

        def post(module, args, kwargs, output):
            if self.replaying or module in bodies:
                return None
            captured["y"] = hidden_of(output)
            captured["carried"] = [output[k] if isinstance(output, (tuple, list)) and k < len(output) else None
                                   for _, k, _ in self.call_site.carried]
            if not self.is_last:
                raise _StageDone

        def past_end(module, args, kwargs):  # a later stage's layer: this stage's last layer was skipped
            if "x" in captured:
                captured["y"] = args[0] if args else kwargs["hidden_states"]
                captured["carried"] = [_argument(module, args, kwargs, where) for _, _, where in self.call_site.carried]
            raise _StageDone

        handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in own]
        handles.append(last_layer.register_forward_hook(post, with_kwargs=True))
        handles += [layer.register_forward_pre_hook(past_end, with_kwargs=True)
                    for layer in self.all_layers[self.ranges[self.rank][1]:]]
        if not self.is_first:
            # a later rank's input embeddings stay on the meta device; a model that embeds other ids with them
            # before its layers (GPT-2's token_type_ids) gets zeros of the shape, as its placeholder inputs_embeds:
            # discarded at the first own layer, whose input is the received hidden states
            def unmaterialised(module, args, output):
                if torch.is_tensor(output) and output.is_meta:
                    return self._placeholder(output.shape)
                return None

            handles.append(self.lm.get_input_embeddings().register_forward_hook(unmaterialised))
        if self.is_last and self.fused_ce:
            def head_input(module, args):  # the fused loss takes the head's input: the logits are never built
                captured["head_input"] = args[0]
                raise _StageDone

            handles.append(self.lm.get_output_embeddings().register_forward_pre_hook(head_input))
        # transformers < 5.23 checkpoints a layer's whole __call__: the hooks must run outside the checkpoint, or
        # its recompute (after they are removed) would run the first layer on the model's placeholder input
        saved_funcs = {}
        for layer in own:
            func = layer.__dict__.get("_gradient_checkpointing_func")
            if func is None or not getattr(layer, "gradient_checkpointing", False):
                continue
            saved_funcs[layer] = func
            layer._gradient_checkpointing_func = HooksOutsideCheckpoint(
                layer, func, pre, post if layer is last_layer else None, bodies)
        stand_ins = _StandIns(self._earlier_layers, self.call_site)
        inputs = {"attention_mask": batch.get("attention_mask")}
        # positions (a packed batch restarts them per sequence) and the other per-token inputs, on every rank
        inputs.update((k, batch[k]) for k in PER_TOKEN_INPUTS if batch.get(k) is not None)
        if self.is_first:
            inputs["input_ids"] = batch["input_ids"]
        else:
            ids = batch["input_ids"]  # only the shape matters: the first layer's input is replaced
            inputs["inputs_embeds"] = self._placeholder((*ids.shape, self.embedding_dim))
        if self.is_last and not self.fused_ce:
            inputs["labels"] = batch["labels"]
            if num_items is not None:
                inputs["num_items_in_batch"] = num_items
        try:
            output = self.lm(**inputs, use_cache=False)
            task = output.loss if self.is_last else None
        except _StageDone:
            task = None
            if self.is_last:
                task = head_task_loss(self.lm, captured["head_input"], lce.shift_labels_of(batch["labels"]),
                                      num_items_in_batch=num_items, impl=self.fused_ce)
        finally:
            stand_ins.close()
            for h in handles:
                h.remove()
            for layer, func in saved_funcs.items():
                layer._gradient_checkpointing_func = func
        if "x" not in captured or ("y" not in captured and not self.is_last):
            first, end = self.ranges[self.rank]
            raise LoptPatchError(
                f"pipeline rank {self.rank}: in this forward the model ran none of the stage's layers ({first}-"
                f"{end - 1}) or ended without its last (a model that runs some layers only sometimes: Mllama's "
                "cross-attention layers without images). Choose boundaries that give every stage a layer that always "
                "runs."
            )
        return captured["x"], captured["leaf"], (captured.get("y"), *captured.get("carried", ())), task

    def _placeholder(self, shape) -> torch.Tensor:
        """Zeros of ``shape`` standing for what a later rank does not compute (its inputs_embeds): a broadcast view,
        nothing allocated per micro-batch, unless the forward writes into its inputs_embeds (a tensor of its own)."""
        if self.writes_inputs_embeds:
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)
        return torch.zeros((), dtype=self.dtype, device=self.device).expand(*shape)

    def _receive(self) -> list:
        """The previous stage's activations: its output hidden states, then what its last layer hands on besides
        them (None where it handed on nothing), each allocated as the header describes it."""
        peer = self._global(self.rank - 1)
        header = torch.empty(1 + len(self.call_site.carried), _HEADER_WIDTH, dtype=torch.int64, device=self.device)
        self.messages.note(self.rank, self.rank - 1, sending=False)
        dist.recv(header, src=peer, group=self.group)
        values = []
        for present, dtype, ndim, *dims in header.tolist():
            if not present:
                values.append(None)
                continue
            values.append(torch.empty(dims[:ndim], dtype=_WIRE_DTYPES[dtype], device=self.device))
            dist.recv(values[-1], src=peer, group=self.group)
        return values

    def _send(self, values) -> None:
        """Send this stage's activations downstream (hidden states first), with a header giving each one's dtype
        and shape: a stage's output need not be (batch, positions, hidden) in the stage's dtype (ZAYA keeps its
        residual stream in fp32, HYV4 several streams per position), nor a handed-on value always present."""
        payloads = [None if v is None else v.detach().contiguous() for v in values]
        header = _header(payloads, self.device)
        self.wait_sends()  # at most one activation in flight: an earlier one must not outlive its micro-batch
        self.messages.note(self.rank, self.rank + 1, sending=True)
        peer = self._global(self.rank + 1)
        for tensor in (header, *(p for p in payloads if p is not None)):
            self._pending_sends.append((dist.isend(tensor, dst=peer, group=self.group), tensor))

    def send(self, tensor: torch.Tensor, peer: int, *, blocking: bool = True):
        """Send ``tensor`` to pipeline rank ``peer`` (counted); the work handle when not ``blocking``."""
        self.messages.note(self.rank, peer, sending=True)
        if blocking:
            return dist.send(tensor, dst=self._global(peer), group=self.group)
        return dist.isend(tensor, dst=self._global(peer), group=self.group)

    def receive(self, buffer: torch.Tensor, peer: int) -> None:
        """Receive into ``buffer`` from pipeline rank ``peer`` (counted)."""
        self.messages.note(self.rank, peer, sending=False)
        dist.recv(buffer, src=self._global(peer), group=self.group)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def wait_sends(self) -> None:
        for work, _ in self._pending_sends:
            work.wait()
        self._pending_sends.clear()

    def run_micro_batch(self, batch: dict, loss_weight: float, num_items_in_batch=None) -> dict:
        """Forward this stage on one micro-batch and accumulate its gradients as ``patch`` accumulates those of
        ``model(**batch, num_items_in_batch=...).loss * loss_weight``: with ``num_items_in_batch`` (the window's
        label-token count, HF Trainer's and TRL's weighting) the task loss is the micro-batch's summed token loss
        over it and the aux term is weighted by the micro-batch's share of it; without, both are micro-batch
        means (weight them ``1 / grad_accum``). Returns this stage's losses as they enter the window's loss,
        before ``loss_weight`` (float tensors). Dropout draws from this stage's own random stream."""
        with self._own_random_state():
            return self._run_micro_batch(batch, loss_weight, num_items_in_batch)

    def _run_micro_batch(self, batch, loss_weight, num_items):
        unknown = sorted(set(batch) - BATCH_KEYS)
        if unknown:
            raise LoptPatchError(
                f"the pipeline got batch keys it does not pass to the model: {unknown}. A stage runs the model on "
                f"{sorted(BATCH_KEYS)} only, so anything else the model would read (output_router_logits, "
                "shift_labels, ...) would be dropped without a word: remove those keys from the batches (or train "
                "with lopt_kernels.patch, which passes every key)."
            )
        span = self.timed_span
        received = None
        if not self.is_first:
            with span("receive"):
                received = self._receive()
        if self.is_last:
            with span("forward"):
                _, _, _, task = self._run_backbone(batch, received, num_items)
            with span("backward"):
                (task * loss_weight).backward()
            return {"task_loss": task.detach().float()}
        with span("forward"):
            x, leaf, y, _ = self._run_backbone(batch, received, num_items)
        with span("send"):
            self._send(y)  # downstream first: the next stage starts while this one runs its local backward
            y = y[0]
        with span("local_backward"):
            spec = BoundarySpec(decoder=self.decoder, backend=self.backend, layerwise_rebuild=False,
                                replay_guard=self, row_mask=self._row_mask(batch))
            share = 1.0
            if num_items is not None:  # the micro-batch's share of the window's label tokens, as patch weights it
                share = float(item_share(label_count(batch), num_items, torch.device("cpu")))
            # the aux term's weight in the model's loss: lambda * mean over the world - 1 boundaries
            weight = share * (loss_weight * self.lambda_aux / (self.world - 1))
            aux = eager.learn_now(spec, eager.EagerTape(x=x, leaf=leaf, layers=list(self.own_layers)), y, weight)
        return {"aux_loss": aux.detach().float() * share}

    def random_state(self) -> list:
        """This stage's random stream (CPU state, CUDA state or None), for a resumable checkpoint."""
        return list(self._random_state)

    def set_random_state(self, state) -> None:
        cpu, cuda = state
        self._random_state = (cpu.cpu(), None if cuda is None else cuda.cpu())

    def _row_mask(self, batch: dict) -> torch.Tensor | None:
        """``aux_mask="tokens"``: the non-padding positions (the batch's 2-D attention mask), flat; else None."""
        mask = batch.get("attention_mask")
        if self.aux_mask != "tokens" or not torch.is_tensor(mask) or mask.dim() != 2:
            return None
        return mask.reshape(-1).to(self.device) != 0

    @contextlib.contextmanager
    def _own_random_state(self):
        """Run with this stage's random stream swapped in (and the caller's restored after): dropout masks
        differ between ranks started with the same seed, and the caller's own draws (data shuffling, which
        must agree across ranks) are untouched."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self._random_state[0])
            if cuda:
                torch.cuda.set_rng_state(self._random_state[1], self.device)
            try:
                yield
            finally:
                self._random_state = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)

    def timed_span(self, kind: str):
        """A context manager that records its wall-clock span in ``timeline`` as ``kind``."""
        return _timed(self.timeline.spans, kind)

    # checkpoints ---------------------------------------------------------------------------------
    def save_shard(self, directory: str) -> str:
        """Write this rank's trained tensors (global names; the decoder as ``lopt_aux_decoders.<rank>.*``)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        os.makedirs(directory, exist_ok=True)
        persistent = self.lm.state_dict(keep_vars=True)
        # LoRA-wrapped layers keep their weight as ``<layer>.base_layer.weight``: saved under the model's own name (the
        # LoRA tensors keep theirs: two adapted parameters of one module nest, ``experts.base_layer.lora_A`` is not
        # ``experts.lora_A``)
        # a tensor tied to another is saved under both names, a copy under its alias (safetensors stores no shared
        # memory): the joined checkpoint's untied config ties neither
        tensors = {model_key(n): (t.detach().to("cpu").contiguous().clone() if n in self.aliases
                                                     else t.detach().to("cpu").contiguous())
                   for n, t in persistent.items() if self.owns(n, t)}
        if self.decoder is not None:
            tensors.update((f"{AUX_DECODERS_ATTR}.{self.rank}.{n}", v.detach().to("cpu").contiguous())
                           for n, v in self.decoder.state_dict().items())
        path = os.path.join(directory, f"{SHARD_PREFIX}-{self.rank}-of-{self.world}.safetensors")
        save_file(tensors, path, metadata={"format": "pt"})
        if self.is_first:
            self.lm.config.save_pretrained(directory)
            if self.adapter is not None:
                import shutil  # noqa: PLC0415

                shutil.copy(os.path.join(self.adapter, "adapter_config.json"), directory)
        return path
