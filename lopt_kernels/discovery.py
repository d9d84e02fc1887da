"""Finding what ``patch`` changes in a Hugging Face causal LM, and validating its options.

The layer stack is found by structure (the ``nn.ModuleList`` holding ``config.num_hidden_layers``
layers of one class), never by a model family's name.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

from .boundary import BOUNDARY_MODES
from .errors import LoptPatchError
from .ops.reconstruction_loss.checks import BACKENDS
from .state import LoptSettings

SUPPORTED_FAMILIES = (
    "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text), Phi3, GPT-2, GPT-NeoX, and any decoder-only "
    "causal LM whose backbone runs an nn.ModuleList of config.num_hidden_layers layers"
)
# "auto" and every boundary mode: a new mode is its module and its entry in boundary.BOUNDARY_MODES
MODES = ("auto", *BOUNDARY_MODES)
AUX_MASKS = ("all", "tokens")
FUSED_CE = ("auto", "liger", "torch", "chunked", "off")
AUX_DECODERS_ATTR = "lopt_aux_decoders"


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def text_config(lm):
    """The text model's config (the config itself for a text-only causal LM)."""
    config = getattr(lm, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _causal_lm_class_names() -> set[str]:
    """Names of the classes ``AutoModelForCausalLM`` builds: transformers' own (read by name, so that no
    model module is imported) and those registered at run time (remote code loaded through the auto class,
    ``AutoModelForCausalLM.register``)."""
    try:
        from transformers.models.auto import modeling_auto  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers is a dependency
        return set()
    names = set()
    for value in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    extra = getattr(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, "_extra_content", {})
    names.update(getattr(cls, "__name__", str(cls)) for cls in extra.values())
    return names


def is_causal_lm_class(cls: type) -> bool:
    """Whether ``cls`` is an ``AutoModelForCausalLM`` class, a subclass of one, or named ``*ForCausalLM``
    (a custom decoder-only causal LM)."""
    names = _causal_lm_class_names()
    return any(c.__name__ in names or c.__name__.endswith("ForCausalLM") for c in cls.__mro__)


def check_decoder_only_causal_lm(lm: nn.Module) -> None:
    """Refuse encoder-decoder models (T5, BART, Whisper) and models that are not causal LMs (masked LMs,
    classifiers): their layer stacks look alike, but LoPT's task loss and boundaries assume one causal
    decoder stack."""
    name = type(lm).__name__
    if getattr(getattr(lm, "config", None), "is_encoder_decoder", False):
        raise LoptPatchError(
            f"{name} is an encoder-decoder model (config.is_encoder_decoder=True); lopt_kernels.patch supports "
            f"decoder-only causal LMs only (load one with AutoModelForCausalLM). Supported: {SUPPORTED_FAMILIES}."
        )
    if not is_causal_lm_class(type(lm)):
        raise LoptPatchError(
            f"{name} is not a decoder-only causal LM: its class is none of the classes AutoModelForCausalLM "
            "builds (transformers' MODEL_FOR_CAUSAL_LM_MAPPING or a class registered with "
            "AutoModelForCausalLM.register), nor a subclass of one, nor named *ForCausalLM. Load the model "
            f"with AutoModelForCausalLM. Supported: {SUPPORTED_FAMILIES}."
        )


def _common_prefix(a: str, b: str) -> int:
    """How many leading dotted components two module names share (the depth of their common ancestor)."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def find_layer_stack(lm: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The decoder layer stack: an ``nn.ModuleList`` of ``config.num_hidden_layers`` layers of one class. Where
    several match (a multimodal model's vision or audio tower of as many layers), the one nearest the input
    embeddings wins (the text decoder's: its common ancestor with them is deepest), then the shallowest. Several
    lists under one module that tie (XLM keeps its attentions, norms and feed-forwards in parallel lists: a layer is
    no one module) are refused: hooking one of them would put the boundary inside a layer."""
    config = text_config(lm)
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
            candidates.append(name)
    if not candidates:
        raise LoptPatchError(
            f"{type(lm).__name__}: no nn.ModuleList of {num_layers} decoder layers (config.num_hidden_layers) was "
            f"found. Supported: {SUPPORTED_FAMILIES}."
        )
    embeddings = lm.get_input_embeddings()
    embeddings_name = next((n for n, m in lm.named_modules() if m is embeddings), "") if embeddings is not None else ""

    def rank(name: str) -> tuple:
        mixed = len({type(m) for m in lm.get_submodule(name)}) > 1  # a hybrid stack (Jamba: attention and Mamba)
        return (-_common_prefix(name, embeddings_name) if embeddings_name else 0, mixed, name.count("."))

    name = min(candidates, key=lambda n: (*rank(n), n))
    owner_name, _, attr = name.rpartition(".")
    ties = [n for n in candidates if n != name and rank(n) == rank(name) and n.rpartition(".")[0] == owner_name]
    if ties:
        lists = ", ".join(f"{n!r} ({type(lm.get_submodule(n)[0]).__name__})" for n in [name, *ties])
        raise LoptPatchError(
            f"{type(lm).__name__}: {owner_name or 'the model'} holds several nn.ModuleLists of {num_layers} modules "
            f"({lists}), so a decoder layer is not one module and LoPT's block boundary (a hook on a layer's output) "
            f"would fall inside a layer. lopt_kernels supports causal LMs whose backbone runs one nn.ModuleList of "
            f"config.num_hidden_layers decoder layers. Supported: {SUPPORTED_FAMILIES}."
        )
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


def _layer_indices(boundaries, num_layers: int) -> tuple[int, ...]:
    """``boundaries`` as a tuple of ints: only a list or tuple of integers is accepted (no str, set,
    float or bool; numpy/torch integer scalars are read through ``operator.index``)."""
    example = f"e.g. boundaries=[{max(num_layers // 2, 1)}] for two blocks"

    def refuse(detail):
        return LoptPatchError(
            f"boundaries must be a list or tuple of int layer indices (the first layer of each block after the "
            f"first), {detail}; {example}"
        )

    if not isinstance(boundaries, (list, tuple)):
        raise refuse(f"got {type(boundaries).__name__} {boundaries!r}")
    bounds = []
    for b in boundaries:
        is_bool = isinstance(b, bool) or (torch.is_tensor(b) and b.dtype == torch.bool)
        try:
            if is_bool:
                raise TypeError
            bounds.append(operator.index(b))
        except TypeError:
            raise refuse(f"got {boundaries!r} (item {b!r} of type {type(b).__name__} is not an int)") from None
    return tuple(bounds)


def resolve_boundaries(num_layers: int, num_blocks, boundaries) -> tuple[int, ...]:
    if boundaries is not None:
        bounds = _layer_indices(boundaries, num_layers)
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


def check_weight_sharing(lm: nn.Module, backbone: nn.Module, layers: nn.ModuleList, bounds: tuple[int, ...]) -> None:
    """Refuse weights shared across a block boundary.

    Each block learns from its own loss (the task loss for the final block, a reconstruction loss for
    every other block, no gradient crossing a boundary), so a parameter used in two blocks would be
    trained by both losses while ``param_groups`` puts it in one group; and the boundary hooks sit on
    the layer modules of the non-final blocks, so one layer module at two positions runs its block's
    hooks at both (in eager mode the embeddings then silently get no gradient). Sharing within one block
    is fine (the block's local backward, or the ordinary backward of the final block, sums the uses),
    except that a module repeated inside a non-final block would still run its hooks twice: repeated
    module objects are accepted only inside the final block.
    """
    num_layers = len(layers)
    starts = (0, *bounds, num_layers)
    final = len(bounds)
    block_of = [b for b in range(final + 1) for _ in range(starts[b], starts[b + 1])]

    def span(b: int) -> str:
        return f"block {b} = layers {starts[b]}-{starts[b + 1] - 1}"

    def one_block_hint(j: int, i: int) -> str:
        """How boundaries can keep layers j < i in one block: every boundary <= j or > i."""
        if j == 0 and i == num_layers - 1:
            return f"untie the weights (no choice of boundaries puts layers {j} and {i} in one block)"
        return (f"pass boundaries=[...] with no block starting at layers {j + 1}-{i}, so that layers {j} and {i} "
                "lie in one block, or untie the weights")

    first_position: dict[int, int] = {}
    for i, layer in enumerate(layers):
        j = first_position.setdefault(id(layer), i)
        if j == i or block_of[i] == block_of[j] == final:
            continue
        where = (f"in two blocks ({span(block_of[j])}; {span(block_of[i])})" if block_of[i] != block_of[j]
                 else f"inside the non-final {span(block_of[i])}")
        fix = "give each position its own module (copy.deepcopy)"
        if j >= 1:
            fix += f", or put both positions in the final block (boundaries=[...] whose last entry is <= {j})"
        raise LoptPatchError(
            f"layers {j} and {i} are the same module ({type(layer).__name__}), {where}. lopt_kernels hooks the "
            "layer modules of the non-final blocks, so that block's boundary hooks would run at both positions "
            "and train it wrongly; a repeated layer module is supported only inside the final block "
            f"({span(final)}). Fix: {fix}."
        )

    # id(param) -> (layer index or None for the embeddings, description of where it was first seen)
    owner: dict[int, tuple[int | None, str]] = {}
    embeddings = [("input embeddings", lm.get_input_embeddings())]
    for child_name, child in backbone.named_children():  # modules before the stack feed block 0
        if child is layers:
            break
        embeddings.append((f"module {child_name!r} before the layer stack", child))
    for label, module in embeddings:
        for name, p in module.named_parameters():
            owner.setdefault(id(p), (None, f"the {label} ({name})"))
    seen_layers: set[int] = set()
    for i, layer in enumerate(layers):
        if id(layer) in seen_layers:  # a repeated module inside the final block (accepted above)
            continue
        seen_layers.add(id(layer))
        for name, p in layer.named_parameters():
            j, first = owner.setdefault(id(p), (i, f"layer {i}'s {name}"))
            block_j = 0 if j is None else block_of[j]
            if block_j == block_of[i]:
                continue
            if j is not None:
                raise LoptPatchError(
                    f"layers {j} and {i} share a parameter tensor ({first} is layer {i}'s {name}) across a block "
                    f"boundary ({span(block_j)}; {span(block_of[i])}). Each block learns from its own loss with no "
                    "gradient crossing a boundary, so a weight used in two blocks would be trained by both; sharing "
                    f"within one block is supported. Fix: {one_block_hint(j, i)}."
                )
            fix = ("untie the weights" if i == num_layers - 1 else
                   f"untie the weights, or put layer {i} in block 0 (boundaries=[...] whose first entry is > {i})")
            raise LoptPatchError(
                f"{first} and layer {i}'s {name} are one parameter tensor, but the embeddings feed block 0 and "
                f"layer {i} is in {span(block_of[i])}. Each block learns from its own loss with no gradient crossing "
                f"a boundary, so the weight would be trained by both. Fix: {fix}."
            )


def kv_sharing_pairs(config, num_layers: int) -> list[tuple[int, int]]:
    """``(producer, consumer)`` layer pairs where the consumer attends with the keys/values the producer computed
    (Gemma3n's KV sharing: ``kv_sharing_modes`` "store" / "reuse", or its last ``num_kv_shared_layers``), matched by
    layer type."""
    types = getattr(config, "layer_types", None)
    try:
        modes = getattr(config, "kv_sharing_modes", None)
    except ValueError:  # a property that checks the layer types (Gemma3n): the count below still applies
        modes = None
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    sources = getattr(config, "kv_source_layers", None)
    if isinstance(sources, (list, tuple)) and len(sources) == num_layers:  # explicit: layer i reads layer sources[i]
        return [(src, i) for i, src in enumerate(sources) if isinstance(src, int) and 0 <= src < i]
    if not isinstance(types, (list, tuple)) or len(types) != num_layers:
        return []
    if not isinstance(modes, (list, tuple)) or len(modes) != num_layers:
        if not isinstance(shared, int) or not 0 < shared < num_layers:
            return []
        first = num_layers - shared
        modes = [None] * first + ["reuse"] * shared
    pairs = []
    reuses = [isinstance(mode, str) and mode.startswith("reuse") for mode in modes]
    for consumer, reuse in enumerate(reuses):
        if not reuse:
            continue
        same_type = [i for i in range(consumer) if types[i] == types[consumer] and not reuses[i]]
        stores = [i for i in same_type if modes[i] == "store"]
        if stores or same_type:
            pairs.append(((stores or same_type)[-1], consumer))
    return pairs


def check_kv_sharing(config, num_layers: int, bounds: tuple[int, ...]) -> None:
    """Refuse a block boundary between a layer and a later one that reuses its keys/values: the task loss would
    reach the earlier block through them (stored mode), or the modes would disagree."""
    pairs = kv_sharing_pairs(config, num_layers)
    crossing = [(s, p, c) for s in bounds for p, c in pairs if p < s <= c]
    if not crossing:
        return
    s, p, c = crossing[0]
    valid = [b for b in range(1, num_layers) if not any(p_ < b <= c_ for p_, c_ in pairs)]
    hint = (f"boundaries from {valid} (e.g. boundaries={valid[-1:]})" if valid
            else "no boundary keeps every such pair in one block: this model cannot be split")
    raise LoptPatchError(
        f"layer {c} reuses the keys and values layer {p} computes (KV sharing, config.kv_sharing_modes / "
        f"num_kv_shared_layers), and a block boundary at layer {s} would put them in different blocks, letting the "
        f"task loss reach the earlier block through the shared keys/values. Choose {hint}."
    )


def validate(model, num_blocks, boundaries, lambda_aux, mode, backend, aux_mask, fused_ce):
    lm = unwrap_causal_lm(model)
    if any(c.__name__ == "PipelineModule" and c.__module__.startswith("deepspeed") for c in type(lm).__mro__):
        raise LoptPatchError(
            "DeepSpeed pipeline parallelism (deepspeed.pipe.PipelineModule) is not supported: its engine runs the "
            "layers stage by stage with its own schedule and loss, outside the model forward that the LoPT hooks "
            "follow. Patch the Hugging Face model itself and shard it with ZeRO stage 1, 2 or 3 "
            "(TrainingArguments(deepspeed=...) or accelerate launch with a DeepSpeed config)."
        )
    try:
        from transformers import PreTrainedModel  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = nn.Module
    if not isinstance(lm, PreTrainedModel) or lm.get_output_embeddings() is None or lm.get_input_embeddings() is None:
        raise LoptPatchError(
            f"lopt_kernels.patch needs a Hugging Face causal LM (AutoModelForCausalLM), got {type(lm).__name__}. "
            f"Supported: {SUPPORTED_FAMILIES}."
        )
    check_decoder_only_causal_lm(lm)
    backbone, attr, layers = find_layer_stack(lm)
    bounds = resolve_boundaries(len(layers), num_blocks, boundaries)
    check_weight_sharing(lm, backbone, layers, bounds)
    check_kv_sharing(text_config(lm), len(layers), bounds)
    try:
        lam = float(lambda_aux)
    except (TypeError, ValueError):
        raise LoptPatchError(f"lambda_aux must be a number >= 0, got {lambda_aux!r}") from None
    if math.isnan(lam) or lam < 0 or math.isinf(lam):
        raise LoptPatchError(f"lambda_aux must be a finite number >= 0, got {lambda_aux!r}")
    if mode not in MODES:
        raise LoptPatchError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise LoptPatchError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if aux_mask not in AUX_MASKS:
        raise LoptPatchError(f"aux_mask must be one of {AUX_MASKS}, got {aux_mask!r}")
    if fused_ce not in FUSED_CE:
        raise LoptPatchError(f"fused_ce must be one of {FUSED_CE}, got {fused_ce!r}")
    return lm, backbone, layers, LoptSettings(bounds, lam, mode, backend, aux_mask, fused_ce)

