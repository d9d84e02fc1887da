"""A LoPT pipeline stage: this rank's block, built and read alone; one micro-batch's forward, send and local
backward."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..aux_decoder import AuxDecoder
from ..block_hooks import HooksOutsideCheckpoint
from ..boundary import eager
from ..boundary.common import BoundarySpec, hidden_of, local_loss_and_grads
from ..discovery import LoptPatchError, find_layer_stack, resolve_boundaries, text_config
from ..ops import linear_cross_entropy as lce
from ..task_loss_hooks import fused_ce_choice
from .checkpoint import DECODER_FILE, SHARD_PREFIX, _inject_adapter, _safetensors_index


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
    """Point-to-point operations this rank issued, by the peer's side: every send and receive of a stage goes
    through :meth:`PipelineStage.send` / :meth:`PipelineStage.receive`, which count them here (a test asserts
    that nothing is sent to an earlier rank or received from a later one)."""

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


def stage_layer_ranges(num_layers: int, world: int, boundaries=None) -> list[tuple[int, int]]:
    """``[(first, end), ...]``, one contiguous layer range per rank."""
    if world < 2:
        raise LoptPatchError(f"a LoPT pipeline needs at least 2 ranks (one block each), got world size {world}")
    if num_layers < world:
        raise LoptPatchError(
            f"the model has {num_layers} layers, fewer than the {world} pipeline stages; launch at most "
            f"{num_layers} processes."
        )
    if boundaries is not None and len(boundaries) != world - 1:
        raise LoptPatchError(
            f"boundaries={list(boundaries)} places {len(boundaries) + 1} stages but the world size is {world}: give "
            f"{world - 1} boundaries (the first layer of each stage after the first), or launch {len(boundaries) + 1} "
            "processes."
        )
    bounds = resolve_boundaries(num_layers, None if boundaries is not None else world, boundaries)
    starts = (0, *bounds, num_layers)
    return [(starts[i], starts[i + 1]) for i in range(world)]


def _check_ranks_agree(group, world: int, dtype: torch.dtype, num_layers: int, ranges) -> None:
    """One clear error on every rank, before any compute, when the ranks were started inconsistently."""
    mine = {"dtype": str(dtype), "num_layers": num_layers, "ranges": [list(r) for r in ranges]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for key in mine:
        values = {json.dumps(o[key]) for o in everyone}
        if len(values) > 1:
            raise LoptPatchError(
                f"pipeline ranks disagree on {key}: {[o[key] for o in everyone]}; start every rank with the same "
                "model, dtype and placement."
            )


def _fused_ce_impl(lm) -> str | None:
    """The last stage's fused linear cross-entropy, chosen as ``patch`` chooses it; None (the model's own loss)
    also for mixture-of-experts models, whose router term spans every stage's layers."""
    if hasattr(text_config(lm), "output_router_logits"):
        return None
    return fused_ce_choice(lm, "auto", lm.get_output_embeddings().weight.device)[0]


# Batch entries besides input_ids, attention_mask and labels that a stage passes to the model's forward.
PER_TOKEN_INPUTS = ("position_ids", "token_type_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                    "seq_idx")


class PipelineStage:
    """This rank's part of a LoPT pipeline: its block's layers, its aux decoder (every stage but the last),
    the input embeddings (rank 0) and the final norm and head (last rank)."""

    def __init__(self, lm: nn.Module, *, rank: int, world: int, ranges, lambda_aux: float, decoder: AuxDecoder | None,
                 group=None, backend: str = "auto", adapter: str | None = None):
        self.lm, self.rank, self.world, self.group, self.adapter = lm, rank, world, group, adapter
        self.ranges, self.lambda_aux, self.decoder, self.backend = ranges, float(lambda_aux), decoder, backend
        self.backbone, self.layers_attr, self.all_layers = find_layer_stack(lm)
        self._layers_prefix = next(n for n, m in lm.named_modules() if m is self.all_layers)
        first, end = ranges[rank]
        self.own_layers = nn.ModuleList(self.all_layers[first:end])
        self.is_first, self.is_last = rank == 0, rank == world - 1
        self.messages = MessageCount()
        self.timeline = StageTimeline()
        self.replaying = False  # set while a checkpointed layer recomputes inside the local backward
        self._pending_sends: list = []
        hidden = text_config(lm).hidden_size
        self.hidden_size = hidden
        self.fused_ce = _fused_ce_impl(lm) if self.is_last else None
        self.dtype = next(p.dtype for p in self.own_layers.parameters())
        self.device = next(p.device for p in self.own_layers.parameters())

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str, *, boundaries=None, lambda_aux: float = 10.0,
                        dtype: torch.dtype = torch.float32, device="cpu", group=None, backend: str = "auto",
                        aux_decoders: str | None = None, attn_implementation: str = "sdpa",
                        gradient_checkpointing: bool = False, adapter: str | None = None):
        """Build this rank's part of the model saved in ``model_dir`` (``save_pretrained`` output), reading only
        its own tensors. ``aux_decoders``: a directory holding ``lopt_aux_decoders.safetensors`` to start the
        decoders from (default: ``model_dir``'s, if present; otherwise a fresh, seeded initialisation).
        ``adapter``: a PEFT LoRA adapter directory (``save_pretrained`` of a PeftModel) to train instead of the
        full model: the base weights are frozen, each rank trains its layers' LoRA weights and its decoder."""
        from safetensors import safe_open  # noqa: PLC0415
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

        if not dist.is_initialized():
            raise LoptPatchError("PipelineStage needs torch.distributed initialised (launch with torchrun)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        config = AutoConfig.from_pretrained(model_dir)
        num_layers = config.get_text_config().num_hidden_layers
        ranges = stage_layer_ranges(num_layers, world, boundaries)
        _check_ranks_agree(group, world, dtype, num_layers, ranges)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        backbone, attr, layers = find_layer_stack(lm)
        first, end = ranges[rank]
        inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
        if out.weight is inp.weight:  # LoPT unties them (as patch does): the head trains on the last rank only
            out.weight = nn.Parameter(torch.empty_like(inp.weight, device="meta"))
        skip = {id(m) for i, layer in enumerate(layers) if not first <= i < end for m in layer.modules()}
        if rank != 0:
            skip.add(id(inp))
        if rank != world - 1:
            skip.add(id(out))
        keep = [(name, m) for name, m in lm.named_modules() if id(m) not in skip]
        for _, module in keep:
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    module._parameters[key] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
            for key, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[key] = torch.empty_like(b, device=device)
        with torch.no_grad():
            for _, module in keep:
                lm._init_weights(module)  # non-persistent buffers (rotary frequencies), then overwritten below
            index = _safetensors_index(model_dir)
            params = {name: p for name, p in lm.named_parameters() if not p.is_meta}
            buffers = {name: b for name, b in lm.named_buffers() if not b.is_meta}
            by_file: dict[str, list] = {}
            for name, tensor in {**params, **buffers}.items():
                source = name
                if source not in index and tensor is out.weight:  # a tied checkpoint: the head starts as the embeddings
                    source = next((k for k in index if k.endswith("embed_tokens.weight")), name)
                if source not in index:
                    if name in params:
                        raise LoptPatchError(f"{model_dir} has no tensor {name} (not a checkpoint of this model)")
                    continue  # a non-persistent buffer, computed above
                by_file.setdefault(index[source], []).append((source, tensor))
            for path, items in by_file.items():  # each file opened once, only this rank's tensors read
                with safe_open(path, "pt", device=str(device)) as f:
                    for source, tensor in items:
                        tensor.copy_(f.get_tensor(source).to(tensor.dtype))
        if adapter is not None:
            _inject_adapter(lm, adapter, index, device)
        decoder = None
        if rank != world - 1:
            decoder = AuxDecoder(config.get_text_config().hidden_size, device=device, dtype=dtype)
            path = os.path.join(aux_decoders or model_dir, DECODER_FILE)
            prefix = f"lopt_aux_decoders.{rank}."
            from_shard = aux_decoders is None and any(k.startswith(prefix) for k in index)
            if from_shard:  # a pipeline checkpoint: this rank's decoder is in its shard
                with safe_open(index[next(k for k in index if k.startswith(prefix))], "pt") as f:
                    decoder.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
            elif os.path.isfile(path):
                from safetensors.torch import load_file  # noqa: PLC0415

                saved = load_file(path)
                decoder.load_state_dict({k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".")[0] == str(rank)})
            elif aux_decoders is not None:
                raise LoptPatchError(f"{path} does not exist")
            else:  # the decoder's own initialisation, seeded per rank (the same on every launch)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(1234 + rank)
                    decoder.reset_parameters()
        lm.train()
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable({"use_reentrant": False})  # the local backward is an autograd.grad
        return cls(lm, rank=rank, world=world, ranges=ranges, lambda_aux=lambda_aux, decoder=decoder, group=group,
                   backend=backend, adapter=adapter)

    def owns(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether this rank trains and saves the model tensor ``name``: its layers'; the input embeddings on
        rank 0; everything else outside the layer stack (final norm, head) on the last rank. Other ranks may
        hold a copy they only run (rotary tables), never one they train."""
        if tensor.is_meta:
            return False
        prefix = self._layers_prefix + "."
        if name.startswith(prefix):
            first, end = self.ranges[self.rank]
            return first <= int(name[len(prefix):].split(".")[0]) < end
        if tensor is self.lm.get_input_embeddings().weight:
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
    def _run_backbone(self, batch: dict, received: torch.Tensor | None):
        """This stage's layers on ``received`` (or on the embeddings, rank 0), through the model's own forward so
        that masks and position embeddings are the model's; returns (stage input, stage output or the model
        output on the last rank)."""
        captured = {}
        first_layer, last_layer = self.own_layers[0], self.own_layers[-1]

        bodies = []  # layers whose checkpointed call runs (see HooksOutsideCheckpoint): the hooks stand aside

        def pre(module, args, kwargs):
            if self.replaying or module in bodies:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            x = hidden if received is None else received
            # the block runs from a detached copy (stop-grad); on rank 0 the embeddings' gradient goes through it
            leaf = x.detach().requires_grad_(self.is_first and x.requires_grad)
            captured["x"], captured["leaf"] = x, leaf
            if args:
                return (leaf, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf}

        def post(module, args, kwargs, output):
            if self.replaying or module in bodies:
                return None
            captured["y"] = hidden_of(output)
            if not self.is_last:
                raise _StageDone

        handles = [first_layer.register_forward_pre_hook(pre, with_kwargs=True),
                   last_layer.register_forward_hook(post, with_kwargs=True)]
        if self.is_last and self.fused_ce:
            def head_input(module, args):  # the fused loss takes the head's input: the logits are never built
                captured["head_input"] = args[0]
                raise _StageDone

            handles.append(self.lm.get_output_embeddings().register_forward_pre_hook(head_input))
        # transformers < 5.23 checkpoints a layer's whole __call__: the hooks must run outside the checkpoint, or
        # its recompute (after they are removed) would run the first layer on the model's placeholder input
        saved_funcs = {}
        for layer, hooks in ((first_layer, (pre, post if last_layer is first_layer else None)),
                             (last_layer, (None, post))):
            func = layer.__dict__.get("_gradient_checkpointing_func")
            if layer in saved_funcs or func is None or not getattr(layer, "gradient_checkpointing", False):
                continue
            saved_funcs[layer] = func
            layer._gradient_checkpointing_func = HooksOutsideCheckpoint(layer, func, *hooks, bodies)
        setattr(self.backbone, self.layers_attr, self.own_layers)  # the backbone iterates this stage's layers only
        # ... and indexes per-layer settings by its loop position: the stage's j-th layer is layer first + j
        config = text_config(self.lm)
        layer_types = getattr(config, "layer_types", None)
        per_layer_types = isinstance(layer_types, (list, tuple)) and len(layer_types) == len(self.all_layers)
        if per_layer_types:
            first, end = self.ranges[self.rank]
            config.layer_types = type(layer_types)(layer_types[first:end])
        inputs = {"attention_mask": batch.get("attention_mask")}
        # positions (a packed batch restarts them per sequence) and the other per-token inputs, on every rank
        inputs.update((k, batch[k]) for k in PER_TOKEN_INPUTS if batch.get(k) is not None)
        if self.is_first:
            inputs["input_ids"] = batch["input_ids"]
        else:
            ids = batch["input_ids"]  # only the shape matters: the first layer's input is replaced
            inputs["inputs_embeds"] = torch.zeros((), dtype=self.dtype, device=self.device).expand(
                *ids.shape, self.hidden_size)  # a broadcast view: nothing allocated per micro-batch
        if self.is_last and not self.fused_ce:
            inputs["labels"] = batch["labels"]
        try:
            output = self.lm(**inputs, use_cache=False)
            task = output.loss if self.is_last else None
        except _StageDone:
            task = None
            if self.is_last:
                head = self.lm.get_output_embeddings()
                task = lce.linear_cross_entropy(captured["head_input"], head.weight,
                                                lce.shift_labels_of(batch["labels"]), bias=head.bias, impl=self.fused_ce)
        finally:
            setattr(self.backbone, self.layers_attr, self.all_layers)
            if per_layer_types:
                config.layer_types = layer_types
            for h in handles:
                h.remove()
            for layer, func in saved_funcs.items():
                layer._gradient_checkpointing_func = func
        return captured["x"], captured["leaf"], captured["y"], task

    def _receive(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        buffer = torch.empty(*ids.shape, self.hidden_size, dtype=self.dtype, device=self.device)
        self.receive(buffer, self.rank - 1)
        return buffer

    def _send(self, y: torch.Tensor) -> None:
        payload = y.detach().contiguous()
        self.wait_sends()  # at most one activation in flight: an earlier one must not outlive its micro-batch
        self._pending_sends.append((self.send(payload, self.rank + 1, blocking=False), payload))

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

    def run_micro_batch(self, batch: dict, loss_weight: float) -> dict:
        """Forward this stage on one micro-batch and accumulate its gradients, weighted by ``loss_weight``
        (1 / accumulation steps for a mean over the window). Returns this stage's losses (float tensors)."""
        span = self._span
        received = None
        if not self.is_first:
            with span("receive"):
                received = self._receive(batch)
        if self.is_last:
            with span("forward"):
                _, _, _, task = self._run_backbone(batch, received)
            with span("backward"):
                (task * loss_weight).backward()
            return {"task_loss": task.detach().float()}
        with span("forward"):
            x, leaf, y, _ = self._run_backbone(batch, received)
        with span("send"):
            self._send(y)  # downstream first: the next stage starts while this one runs its local backward
        with span("local_backward"):
            spec = BoundarySpec(decoder=self.decoder, backend=self.backend, layerwise_rebuild=False,
                                replay_guard=self)
            # the aux term's weight in the model's loss: lambda * mean over the world - 1 boundaries
            weight = loss_weight * self.lambda_aux / (self.world - 1)
            if y.dtype == torch.float16:  # eager's path: gradients of a power-of-two-scaled sum, rescaled after
                aux = self._local_backward_rescaled(spec, x, leaf, y, weight)
            else:  # the weight is known: straight into .grad, no second set of block gradients
                aux = self._local_backward_weighted(spec, x, leaf, y, weight)
        return {"aux_loss": aux.detach().float()}

    def _local_backward_weighted(self, spec, x, leaf, y, weight):
        aux, grads = local_loss_and_grads(spec, y.detach(), leaf.detach(), grad_scale=weight)
        grad_y, decoder_grads = grads[0], grads[1:]
        with torch.no_grad():
            for p, g in zip(self.decoder.decoder_parameters(), decoder_grads):
                if p.requires_grad:
                    p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g)
        if y.requires_grad:
            self.replaying = True  # a checkpointed layer's recompute must not re-enter the stage hooks
            try:
                torch.autograd.backward(y, grad_y)
            finally:
                self.replaying = False
            if leaf.requires_grad and leaf.grad is not None:  # rank 0: on into the input embeddings
                grad_x, leaf.grad = leaf.grad, None
                x.backward(grad_x)
        return aux

    def _local_backward_rescaled(self, spec, x, leaf, y, weight):
        tape = eager.EagerTape(x=x, leaf=leaf, layers=list(self.own_layers))
        aux, params, held, scale, unscaled = eager.run_local_backward(spec, tape, y)
        *param_grads, grad_x = held
        if grad_x is not None:
            x.backward(grad_x * (weight / scale))
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, param_grads)):
                if g is not None:
                    factor = weight if i in unscaled else weight / scale
                    p.grad = (g * factor).to(p.dtype) if p.grad is None else p.grad.add_(g, alpha=factor)
        return aux

    def _span(self, kind: str):
        return _timed(self.timeline.spans, kind)

    # checkpoints ---------------------------------------------------------------------------------
    def save_shard(self, directory: str) -> str:
        """Write this rank's trained tensors (global names; the decoder as ``lopt_aux_decoders.<rank>.*``)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        os.makedirs(directory, exist_ok=True)
        persistent = self.lm.state_dict(keep_vars=True)
        # LoRA-wrapped layers keep their weight as ``<layer>.base_layer.weight``: saved under the model's own name
        tensors = {n.replace(".base_layer.", "."): t.detach().to("cpu").contiguous() for n, t in persistent.items()
                   if self.owns(n, t)}
        if self.decoder is not None:
            tensors.update((f"lopt_aux_decoders.{self.rank}.{n}", v.detach().to("cpu").contiguous())
                           for n, v in self.decoder.state_dict().items())
        path = os.path.join(directory, f"{SHARD_PREFIX}-{self.rank}-of-{self.world}.safetensors")
        save_file(tensors, path, metadata={"format": "pt"})
        if self.is_first:
            self.lm.config.save_pretrained(directory)
            if self.adapter is not None:
                import shutil  # noqa: PLC0415

                shutil.copy(os.path.join(self.adapter, "adapter_config.json"), directory)
        return path
