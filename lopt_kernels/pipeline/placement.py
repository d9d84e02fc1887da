"""Where a pipeline stage's tensors live: its layer range, the modules outside the layer stack that the first rank
runs and trains (found by running the model, not by name), the checkpoint tensors it reads, and every check that
must pass on every rank before any compute."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..aux_decoder import AUX_DECODERS_FILE, AuxDecoder
from ..boundary.common import trainable_inputs
from ..discovery import (AUX_DECODERS_ATTR, AUX_MASKS, LoptPatchError, check_kv_sharing, check_weight_sharing,
                         find_layer_stack, resolve_boundaries, text_config)
from ..hf_model import children_around_layers, layer_call_site
from .checkpoint import check_adapter, inject_adapter, safetensors_index


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


def check_ranks_agree(group, world: int, mine: dict, error: str | None) -> None:
    """One clear error on every rank, before any compute: a rank that could not place the model (``error``)
    or ranks started inconsistently (``mine`` differs: dtype, layers, placement, the modules before the layers)."""
    everyone = [None] * world
    dist.all_gather_object(everyone, {"error": error, **mine}, group=group)
    failed = [(r, o["error"]) for r, o in enumerate(everyone) if o["error"]]
    if failed:
        rank, message = failed[0]
        raise LoptPatchError(f"pipeline rank {rank} cannot place the model: {message}")
    for key in mine:
        values = {json.dumps(o[key]) for o in everyone}
        if len(values) > 1:
            raise LoptPatchError(
                f"pipeline ranks disagree on {key}: {[o[key] for o in everyone]}; start every rank with the same "
                "model, dtype and placement."
            )


def _initialisers(lm: nn.Module) -> dict:
    """Module id -> the ``_init_weights`` that initialises it: that of the innermost ``PreTrainedModel`` holding it
    (itself included), as transformers' own ``initialize_weights`` dispatches it. The causal LM's own may read
    attributes only its backbone has (Gemma3n's text model initialises its scale buffers from ``self.hidden_size``)."""
    from transformers import PreTrainedModel  # noqa: PLC0415

    found = {}

    def visit(module, owner):
        if isinstance(module, PreTrainedModel):
            owner = module
        found.setdefault(id(module), owner._init_weights)
        for child in module.children():
            visit(child, owner)

    visit(lm, lm)
    return found


def causal_lm_class(config) -> type:
    """The causal LM class to build from a checkpoint's ``config``: ``AutoModelForCausalLM``'s for its config class,
    or else the ``...ForCausalLM`` class its ``architectures`` names (MllamaForCausalLM saves a MllamaTextConfig,
    which AutoModelForCausalLM does not map)."""
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) in mapping:
        return mapping[type(config)]
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if name.endswith("ForCausalLM") and isinstance(cls, type) and isinstance(config, cls.config_class):
            return cls
    raise LoptPatchError(
        f"no causal LM class for the checkpoint's {type(config).__name__}: AutoModelForCausalLM does not map it and "
        f"its config names no ...ForCausalLM class of this transformers ({getattr(config, 'architectures', None)})"
    )


class _ReachedFirstLayer(Exception):
    """Raised by the probe's hook on the first decoder layer: what ran before it is known."""


def _graph_leaves(tensor: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors (parameters) that ``tensor``'s autograd graph reaches."""
    leaves, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def modules_before_layers(lm: nn.Module, first_layer: nn.Module, device, dtype) -> list[str]:
    """Names of the modules whose forward completes before the first decoder layer runs (learned positions,
    an embedding LayerNorm, dropout, rotary tables: what the first rank runs besides the input embeddings),
    found by running the model's own forward on two positions of ``inputs_embeds`` until that layer starts.
    Needs those modules materialised (values do not matter); the layers may stay on the meta device.

    Refuses a model whose layers read trainable tensors besides their hidden states (per-layer inputs computed
    before the layers, as Gemma3n's and Gemma4's per-layer embeddings): every stage's layers read them, so the task
    loss and each block's aux loss reach the modules that compute them (and the input embeddings) on rank 0, a
    gradient that would have to travel upstream."""
    names = {id(m): n for n, m in lm.named_modules()}
    finished: list[str] = []
    started: dict[int, nn.Module] = {}
    side_inputs: list[str] = []
    read_before: set[int] = set()  # the tensors the first layer's input is computed from

    def note(module, args, output):
        if id(module) in names and names[id(module)] not in finished:
            finished.append(names[id(module)])

    def start(module, args):
        started.setdefault(id(module), module)

    def stop(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_tensor(hidden):
            read_before.update(_graph_leaves(hidden))
        # the hidden states come first, or by name
        rest = {**dict(enumerate(args[1:], 1)), **{k: v for k, v in kwargs.items() if k != "hidden_states"}}
        side_inputs.extend(f"{'argument ' + str(k) if isinstance(k, int) else k} {tuple(t.shape)}"
                           for k, v in rest.items() for t in trainable_inputs((v,), {}))
        raise _ReachedFirstLayer

    handles = [nn.modules.module.register_module_forward_hook(note),
               nn.modules.module.register_module_forward_pre_hook(start),
               first_layer.register_forward_pre_hook(stop, with_kwargs=True)]
    embeds = torch.zeros(1, 2, lm.get_input_embeddings().weight.shape[-1], device=device, dtype=dtype)
    try:
        # with gradients on (two positions): what the layers read besides their hidden states is trainable if it
        # requires grad
        with torch.enable_grad(), torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            lm(inputs_embeds=embeds, use_cache=False)
        raise LoptPatchError(f"{type(lm).__name__}: its forward never reached the first decoder layer")
    except _ReachedFirstLayer:
        pass
    finally:
        for h in handles:
            h.remove()
    if side_inputs:
        raise LoptPatchError(
            f"{type(lm).__name__}: its decoder layers read trainable tensors computed before the layer stack besides "
            f"their hidden states ({', '.join(side_inputs)} at layer 0's call: per-layer inputs). Every stage's layers "
            "read them, so their gradient (the task loss's, and each block's aux loss's) would have to travel back to "
            "rank 0, which owns what computes them; the pipeline sends activations downstream only. Train this model "
            "with lopt_kernels.patch in one process."
        )
    # a module still running when the first layer starts (the backbone) may use its own parameters before the
    # layers, after them, or both: its forward's source says which (ZAYA scales and shifts the embeddings by two of
    # its backbone's own parameters); those it reads before the layers only are rank 0's, after them only the last
    # rank's, others no rank can own. The first layer itself has just started (the global pre-hook runs before its
    # own): its parameters are its stage's, wherever it keeps them (Doge keeps residual scales directly on the layer)
    unplaceable = []
    for i, m in started.items():
        if names.get(i) in finished or i not in names or m is first_layer:
            continue
        stack = next((n for n, child in m.named_children() if any(layer is first_layer for layer in child.children())),
                     None)
        before, after = children_around_layers(type(m), stack) if stack else (frozenset(), frozenset())
        for key, p in m.named_parameters(recurse=False):
            name = f"{names[i]}.{key}" if names[i] else key
            if p is None or key in after and key not in before:
                continue
            (finished if key in before and key not in after else unplaceable).append(name)
    # a parameter the first layer's input is computed from, read without calling its module (ProphetNet adds
    # ngram_embeddings.weight to its predicting streams): rank 0 trains it, as it trains the modules that ran
    direct = {id(p) for i, m in started.items() for p in m.parameters(recurse=False)}
    for name, p in lm.named_parameters():
        if id(p) in read_before and id(p) not in direct \
                and not any(name == f or name.startswith(f + ".") for f in finished):
            finished.append(name)
    if unplaceable:
        raise LoptPatchError(
            f"{type(lm).__name__} keeps parameters directly on a module that runs around its decoder layers "
            f"({', '.join(unplaceable)}): the pipeline cannot tell which stage uses them. Train it with "
            "lopt_kernels.patch in one process."
        )
    return finished


def inputs_embeds_written(lm: nn.Module, first_layer: nn.Module, device, dtype) -> bool:
    """Whether the model's forward fails, before its first decoder layer, on ``inputs_embeds`` given as a broadcast
    view of one zero (how the stages after the first pass their placeholder input, allocating nothing): CTRL scales
    them in place (``inputs_embeds *= sqrt(d)``), which a view whose elements share one memory location refuses.
    Those stages then pass a zero tensor of their own."""

    def stop(module, args):
        raise _ReachedFirstLayer

    handle = first_layer.register_forward_pre_hook(stop)
    view = torch.zeros((), device=device, dtype=dtype).expand(1, 2, lm.get_input_embeddings().weight.shape[-1])
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            lm(inputs_embeds=view, use_cache=False)
    except _ReachedFirstLayer:
        return False
    except Exception:  # noqa: BLE001 - any failure on the view: a tensor of its own is always safe
        return True
    finally:
        handle.remove()
    return False


class WeightMapping:
    """transformers' checkpoint conversions for one model (keys renamed since the checkpoint was written, experts
    stored one tensor each but fused in the model): which model tensor a checkpoint key loads into, and the
    loading of a subset of keys. The identity where this transformers has no conversion API."""

    def __init__(self, renamings: list, converters: list, meta_state: dict, base_model_prefix: str | None):
        self.renamings, self.converters = renamings, converters
        self.meta_state, self.base_model_prefix = meta_state, base_model_prefix

    @classmethod
    def of(cls, lm: nn.Module) -> "WeightMapping":
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415
            from transformers.core_model_loading import WeightConverter  # noqa: PLC0415
        except ImportError:
            return cls([], [], {}, None)
        transforms = list(get_model_conversion_mapping(lm) or [])
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        return cls(renamings, converters, lm.state_dict(keep_vars=True), getattr(lm, "base_model_prefix", None))

    @property
    def converts(self) -> bool:
        return bool(self.renamings or self.converters)

    def targets(self, key: str) -> list[str]:
        """The model tensors the checkpoint tensor ``key`` loads into: one, or each part of a tensor that a
        converter splits (Lara's ``in_proj`` into ``in_proj_qkv``, ``in_proj_z``, ...)."""
        if not self.converts:
            return [key]
        from transformers.core_model_loading import rename_source_key  # noqa: PLC0415

        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.base_model_prefix,
                                             self.meta_state)
        if renamed not in self.meta_state and key in self.meta_state:
            # as from_pretrained: a key the model already names is kept (DeepSeek-V4's attention-norm renaming
            # '.norm.' -> '.kv_norm.' also matches its final 'model.norm.weight')
            return [rename_source_key(key, [], [], self.base_model_prefix, self.meta_state)[0]]
        converter = next((c for c in self.converters if pattern in c.source_patterns), None)
        if converter is None or len(converter.target_patterns) == 1:
            return [renamed]
        # a one-to-many converter names its first target; the conversion writes every target in its place
        first = converter.target_patterns[0]
        return [renamed.replace(first, other, 1) for other in converter.target_patterns]

    def load(self, lm: nn.Module, slices: dict, dtype: torch.dtype, device) -> None:
        """Load the checkpoint tensors ``slices`` (key -> safetensors slice) into ``lm``, converted as
        transformers' ``from_pretrained`` converts them."""
        if not self.converts:
            state = lm.state_dict(keep_vars=True)
            with torch.no_grad():
                for key, value in slices.items():
                    state[key].copy_(value[:].to(device))
            return
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415
        from transformers.core_model_loading import convert_and_load_state_dict_in_model  # noqa: PLC0415
        from transformers.modeling_utils import LoadStateDictConfig  # noqa: PLC0415

        config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(lm), dtype=dtype,
                                     device_map={"": torch.device(device)})
        info = convert_and_load_state_dict_in_model(lm, slices, config)[0]
        problems = [*info.error_msgs, *map(str, info.conversion_errors.items()), *map(str, info.mismatched_keys)]
        if problems:
            raise LoptPatchError(f"reading this stage's tensors failed: {problems[:3]}")


ROUTER_LOSS_MESSAGE = (
    "{model_dir}: the config sets output_router_logits=True, whose load-balancing loss is a function of every "
    "layer's router logits at once, so no stage can compute it from its own layers. Train this mixture-of-experts "
    "model in one process (lopt_kernels.patch), or set output_router_logits=False for the pipeline."
)


@dataclass
class StagePlan:
    """This rank's part of the model, built on the meta device with its own modules allocated (not yet read),
    and where each of its tensors comes from in the checkpoint. ``build`` runs every check; ``load`` reads."""

    model_dir: str
    rank: int
    world: int
    ranges: list
    lm: nn.Module
    device: object
    dtype: torch.dtype
    adapter: str | None
    aux_decoders: str | None
    index: dict  # checkpoint tensor name -> file
    sources: dict  # this rank's tensor name -> the checkpoint keys it is read from
    copies: dict  # a tied checkpoint: this rank's untied head (or embedding) -> the other's checkpoint keys
    mapping: "WeightMapping"
    first_rank_modules: list  # modules outside the layer stack that rank 0 runs and trains
    writes_inputs_embeds: bool = False  # the forward writes into inputs_embeds (later stages pass their own zeros)
    aliases: dict = field(default_factory=dict)  # a tensor tied to another -> the name it is read under

    @classmethod
    def build(cls, model_dir: str, rank: int, world: int, *, boundaries, dtype, device, attn_implementation: str | None,
              adapter: str | None, aux_decoders: str | None, aux_mask: str) -> "StagePlan":
        from transformers import AutoConfig  # noqa: PLC0415

        if aux_mask not in AUX_MASKS:
            raise LoptPatchError(f"aux_mask must be one of {AUX_MASKS}, got {aux_mask!r}")
        config = AutoConfig.from_pretrained(model_dir)
        if getattr(config.get_text_config(), "output_router_logits", False):
            raise LoptPatchError(ROUTER_LOSS_MESSAGE.format(model_dir=model_dir))
        ranges = stage_layer_ranges(config.get_text_config().num_hidden_layers, world, boundaries)
        with torch.device("meta"):
            lm = causal_lm_class(config)._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        backbone, layers_attr, layers = find_layer_stack(lm)
        if layer_call_site(type(backbone), layers_attr) is None:
            raise LoptPatchError(
                f"{type(lm).__name__}: no loop over its layer stack that calls each layer could be read from "
                f"{type(backbone).__name__}.forward's source, so the stages cannot tell what a layer returns and hands "
                "to the next. Train this model with lopt_kernels.patch in one process."
            )
        if "inputs_embeds" not in inspect.signature(type(lm).forward).parameters:
            raise LoptPatchError(
                f"{type(lm).__name__}'s forward takes no inputs_embeds (it builds its inputs from input_ids), so the "
                "stages after the first cannot run it on the hidden states they receive. Train this model with "
                "lopt_kernels.patch in one process."
            )
        # what patch refuses for these boundaries (the pipeline's stages are its blocks): a weight or a layer's keys
        # and values shared across a boundary would reach an earlier stage's parameters from a later stage's loss
        bounds = tuple(first for first, _ in ranges[1:])
        check_weight_sharing(lm, backbone, layers, bounds)
        check_kv_sharing(text_config(lm), len(layers), bounds)
        inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
        module_names = {id(m): n for n, m in lm.named_modules()}
        head_name = module_names[id(out)] + ".weight"
        tied = out.weight is inp.weight
        # modules that hold the input embedding's weight (ProphetNet's wrapper holds another Embedding sharing it)
        embedding_modules = [m for m in lm.modules() if m is not out
                             and any(p is inp.weight for p in m.parameters(recurse=False))]
        # every name the embedding is stored under (ProphetNet's wrapper and decoder share one; a checkpoint keeps one)
        embedding_names = {n for n, t in lm.state_dict(keep_vars=True).items() if t is inp.weight} - {head_name}
        if tied:  # LoPT unties them (as patch does): the head trains on the last rank only
            out.weight = nn.Parameter(torch.empty_like(inp.weight, device="meta"))
        first, end = ranges[rank]
        skip = {id(m) for i, layer in enumerate(layers) if not first <= i < end for m in layer.modules()}
        if rank != 0:
            skip.update(id(m) for m in embedding_modules)
        if rank != world - 1:
            skip.add(id(out))
        keep = [m for m in lm.modules() if id(m) not in skip]
        made: dict[int, nn.Parameter] = {}  # id of a meta parameter -> its allocation: weights tied stay tied
        for module in keep:
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    if id(p) not in made:
                        made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
                    module._parameters[key] = made[id(p)]
            for key, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[key] = torch.empty_like(b, device=device)
        initialiser = _initialisers(lm)
        with torch.no_grad():
            for module in keep:  # non-persistent buffers (rotary frequencies); the rest is read in load
                initialiser[id(module)](module)
        first_rank_modules = [*(module_names[id(m)] for m in embedding_modules),
                              *modules_before_layers(lm, layers[0], device, dtype)]
        writes_inputs_embeds = rank != 0 and inputs_embeds_written(lm, layers[0], device, dtype)
        index = safetensors_index(model_dir)
        mapping = WeightMapping.of(lm)
        mine = {n: t for n, t in lm.state_dict(keep_vars=True).items() if not t.is_meta}
        sources: dict[str, list] = {}  # this rank's tensor name -> the checkpoint keys it is read from
        for key in index:
            for target in mapping.targets(key):
                if target in mine:
                    sources.setdefault(target, []).append(key)
        # a tied checkpoint stores one of the two: the untied head (or embedding) starts from the other
        tied_source = {head_name: embedding_names, **{n: {head_name} for n in embedding_names}} if tied else {}
        copies = {}  # this rank's tensor name -> the model tensor name whose checkpoint keys it is read from
        # a tensor the model ties to another (BertLMHeadModel's decoder bias is its prediction head's bias): a
        # checkpoint stores it once, under the other name
        names_of: dict[int, list] = {}
        for name, tensor in mine.items():
            names_of.setdefault(id(tensor), []).append(name)
        aliases = {}  # the other names of a tied tensor -> the name it is read under (the tie is restored after)
        for group in names_of.values():
            read = [name for name in group if name in sources]
            aliases.update((name, read[0]) for name in group if read and name != read[0])
        for name in mine:
            if name in sources or name in aliases:
                continue
            others = tied_source.get(name)
            if others:
                keys = [k for k in index if others.intersection(mapping.targets(k))]
                if len(keys) == 1:  # an embedding is one tensor in every checkpoint format
                    copies[name] = keys
                    continue
            if isinstance(mine[name], nn.Parameter):
                raise LoptPatchError(f"{model_dir} has no tensor {name} (not a checkpoint of this model)")
            # else a non-persistent buffer, computed above
        if adapter is not None:
            check_adapter(adapter)
        if rank != world - 1 and aux_decoders is not None \
                and not os.path.isfile(os.path.join(aux_decoders, AUX_DECODERS_FILE)):
            raise LoptPatchError(f"{os.path.join(aux_decoders, AUX_DECODERS_FILE)} does not exist")
        return cls(model_dir, rank, world, ranges, lm, device, dtype, adapter, aux_decoders, index, sources, copies,
                   mapping, first_rank_modules, writes_inputs_embeds, aliases)

    def agreement(self) -> dict:
        """What every rank must agree on."""
        return {"dtype": str(self.dtype), "num_layers": len(find_layer_stack(self.lm)[2]),
                "ranges": [list(r) for r in self.ranges], "first_rank_modules": self.first_rank_modules}

    def load(self) -> nn.Module:
        """Read this rank's tensors (only those) and its LoRA adapter; returns the model."""
        from safetensors import safe_open  # noqa: PLC0415

        with contextlib.ExitStack() as stack:
            files = {path: stack.enter_context(safe_open(path, "pt", device="cpu")) for path in set(self.index.values())}

            def read(keys):
                return {k: files[self.index[k]].get_slice(k) for k in keys}

            self.mapping.load(self.lm, read([k for keys in self.sources.values() for k in keys]), self.dtype,
                              self.device)
            state = self.lm.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, (key,) in self.copies.items():
                    state[name].copy_(files[self.index[key]].get_tensor(key))
        # transformers' conversions may load a tensor into a new parameter: the tied name follows it
        for name, read in self.aliases.items():
            module_name, _, key = name.rpartition(".")
            module = self.lm.get_submodule(module_name)
            (module._parameters if key in module._parameters else module._buffers)[key] = state[read]
        if self.adapter is not None:
            inject_adapter(self.lm, self.adapter, self.index, self.device)
        return self.lm

    def decoder(self) -> AuxDecoder:
        """This rank's aux decoder: from a pipeline checkpoint's shard, ``aux_decoders`` (or the model
        directory's) decoder file, or a fresh initialisation seeded per rank (the same on every launch)."""
        from safetensors import safe_open  # noqa: PLC0415

        decoder = AuxDecoder(text_config(self.lm).hidden_size, device=self.device, dtype=self.dtype)
        path = os.path.join(self.aux_decoders or self.model_dir, AUX_DECODERS_FILE)
        prefix = f"{AUX_DECODERS_ATTR}.{self.rank}."
        if self.aux_decoders is None and any(k.startswith(prefix) for k in self.index):  # a pipeline checkpoint
            with safe_open(self.index[next(k for k in self.index if k.startswith(prefix))], "pt") as f:
                decoder.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        elif os.path.isfile(path):
            from safetensors.torch import load_file  # noqa: PLC0415

            saved = load_file(path)
            decoder.load_state_dict({k.split(".", 1)[1]: v for k, v in saved.items()
                                     if k.split(".")[0] == str(self.rank)})
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234 + self.rank)
                decoder.reset_parameters()
        return decoder
