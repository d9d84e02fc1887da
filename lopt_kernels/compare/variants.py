"""The variants ``lopt-kernels compare`` runs: the presets and dtypes, ``Variant``/``VARIANTS``, config loading,
the synthetic batch, building each variant's model, its training step and ``run_variant``, which measures it."""

from __future__ import annotations

import contextlib
import json
import statistics
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .. import block_hooks, patching
from ..discovery import unwrap_causal_lm
from ..measure import measure_step, timed
from ..ops.linear_cross_entropy import check_softcap, resolve_implementation, shift_labels_of

PRESETS = ("tiny", "cpu-1b", "llama3-8b", "qwen2.5-7b", "qwen3-4b", "gemma2-2b")
METRICS = ("memory", "flops", "time")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    name: str
    lopt_mode: str | None  # None: end-to-end; "stored": the reference; "eager"/"activation_free": this library
    checkpointing: bool
    fused_ce: bool


VARIANTS = {
    v.name: v
    for v in (
        Variant("e2e", None, False, False),
        Variant("e2e+fce", None, False, True),
        Variant("e2e+ckpt", None, True, False),
        Variant("e2e+ckpt+fce", None, True, True),
        Variant("seed", "stored", False, False),
        Variant("seed+ckpt", "stored", True, False),
        Variant("lopt", "eager", False, True),
        Variant("lopt+ckpt", "eager", True, True),
        Variant("lopt-af", "activation_free", False, True),
        Variant("lopt-af+ckpt", "activation_free", True, True),
    )
}


RUN_DEFAULTS = {"batch": 2, "seq": 256, "dtype": "fp32", "lora": 0}  # where the config names none


class CompareError(Exception):
    """A bad command line; reported in one line with exit code 2."""


def load_config(name_or_path: str):
    """A transformers config from an embedded preset name or a ``config.json`` path."""
    from transformers import AutoConfig  # noqa: PLC0415

    try:
        data = _config_data(name_or_path)
        data.pop("lopt_compare", None)
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CompareError(f"--config {name_or_path!r} is not a valid transformers config.json: {exc!r}") from None


def _config_data(name_or_path: str) -> dict:
    if name_or_path in PRESETS:
        text = resources.files("lopt_kernels.presets").joinpath(f"{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise CompareError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a readable file")
        try:
            text = path.read_text()
        except OSError as exc:
            raise CompareError(f"--config {name_or_path!r} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object expected, got {type(data).__name__}")
        return data
    except (ValueError, TypeError) as exc:
        raise CompareError(f"--config {name_or_path!r} is not a valid transformers config.json: {exc!r}") from None


def run_defaults(name_or_path: str) -> dict:
    """batch, seq, dtype and LoRA rank to run ``name_or_path`` at when the command line names none: the
    config's own ``lopt_compare`` entry (the ``tiny`` preset has one), else RUN_DEFAULTS."""
    own = _config_data(name_or_path).get("lopt_compare") or {}
    return {key: own.get(key, value) for key, value in RUN_DEFAULTS.items()}


def synthetic_batch(config, batch: int, seq: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : max(1, seq // 8)] = -100  # an untrained prompt prefix
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


@contextlib.contextmanager
def no_packed_sequence_detection():
    """Under fake tensors transformers' packed-sequence detection is data-dependent (and would
    otherwise build a B x T x T mask); a synthetic unpadded batch is never packed."""
    from transformers import masking_utils  # noqa: PLC0415

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _attn_implementation(config) -> str:
    return "eager" if config.model_type == "gemma2" else "sdpa"


def _fake_from_meta(model: torch.nn.Module, fake_mode) -> None:
    """Replace every meta parameter and buffer by an uninitialised fake CPU tensor (shared ones stay
    shared). Building on meta first avoids ``Module.to`` swaps, which fake parameters refuse."""
    replaced: dict[int, torch.Tensor] = {}
    with fake_mode:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in replaced:
                        new = torch.empty(t.shape, dtype=t.dtype)
                        if isinstance(t, torch.nn.Parameter):
                            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                        replaced[id(t)] = new
                    table[name] = replaced[id(t)]


def build_model(config, variant: Variant, *, dtype, device, lora: int, seed: int, fake_mode=None, meta=False):
    """``variant``'s model; on the meta device (shapes only) with ``meta``, in ``fake_mode``'s fake tensors with it."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    with torch.device("meta") if fake_mode is not None or meta else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=_attn_implementation(config), dtype=dtype)
        if device.type != "cpu":
            model.to(device)
        model.config.use_cache = False
        if lora:
            from peft import LoraConfig, get_peft_model  # noqa: PLC0415

            with warnings.catch_warnings():
                # PEFT reads the model's deprecated ``is_gradient_checkpointing`` itself (transformers >= 5.24)
                warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                        category=FutureWarning)
                model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear",
                                                         lora_dropout=0.0))
        if variant.lopt_mode is not None:
            patching.patch(model, mode=variant.lopt_mode, fused_ce="auto" if variant.fused_ce else "off")
    if fake_mode is not None:
        _fake_from_meta(model, fake_mode)
    if variant.checkpointing and not meta:
        enable_checkpointing(model)
    model.train()
    return model


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under the name the installed transformers has:
    ``activation_checkpointing_enable`` (>= 5.24), else ``gradient_checkpointing_enable``."""
    lm = unwrap_causal_lm(model)
    if hasattr(type(lm), "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def user_fused_loss(head: torch.nn.Module, shift_labels: torch.Tensor, softcap: float | None = None):
    """The fused end-to-end loss as its users call it, as a function of the final hidden states (mean over the
    counted labels): on CUDA Liger's ``LigerFusedLinearCrossEntropyLoss`` (what ``use_liger_kernel`` patches in);
    elsewhere torch's native chunked ``torch.nn.functional.linear_cross_entropy(h, lm_head.weight, labels,
    options=torch.nn.LinearCrossEntropyOptions())``. None where no fused loss honours ``softcap`` there."""
    import torch.nn.functional as F  # noqa: PLC0415

    check_softcap(softcap)
    weight, bias = head.weight, head.bias
    labels = shift_labels.reshape(-1)
    if weight.device.type == "cuda":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: PLC0415

        loss_fn = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
        return lambda hidden: loss_fn(weight, hidden.reshape(-1, hidden.shape[-1]), labels, bias)
    if resolve_implementation("torch", weight.device, softcap) is None:
        return None
    return lambda hidden: F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels,
                                                 linear_bias=bias, options=torch.nn.LinearCrossEntropyOptions())


def make_step(model, variant: Variant, batch: dict):
    """A closure running one forward + backward of ``variant``; returns (loss, task_loss, aux_loss). End-to-end
    variants are the steps users run: the model's own loss (``model(**batch).loss``), or with ``fused_ce`` the
    unpatched backbone and ``user_fused_loss`` (Liger on CUDA, torch's chunked linear cross-entropy elsewhere)."""
    lm = unwrap_causal_lm(model)
    loss_of = None
    if variant.lopt_mode is None and variant.fused_ce:
        head = lm.get_output_embeddings()
        softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        loss_of = user_fused_loss(head, shift_labels_of(batch["labels"]), softcap)
        if loss_of is None:
            warnings.warn(f"lopt-kernels compare: {variant.name} runs the model's own loss: no fused cross-entropy "
                          f"honours final-logit soft-capping ({softcap}) on {head.weight.device.type}", stacklevel=2)
    if loss_of is not None:
        backbone = lm.base_model

        def step():
            hidden = backbone(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
            loss = loss_of(hidden)
            loss.backward()
            return loss.detach(), loss.detach(), None
    else:

        def step():
            out = model(**batch, use_cache=False)
            out.loss.backward()
            task = out["task_loss"] if "task_loss" in out else out.loss
            aux = out["lopt_aux_loss"] if "lopt_aux_loss" in out else None
            return out.loss.detach(), task.detach(), None if aux is None else aux.detach()

    return step


def _bottom_task_grad_max(model, batch) -> float:
    """Largest task-loss gradient reaching the bottom half (0.0 when the boundary holds)."""
    state = patching.require_state(model)
    _, bottom = patching.top_and_bottom_params(state)
    decoders = {id(p) for p in state.decoders.parameters()}
    params = [p for p in model.parameters() if id(p) in bottom and id(p) not in decoders and p.requires_grad]
    probe = model(**batch, use_cache=False)
    with warnings.catch_warnings():  # backpropagating the task loss alone is the point of the probe
        warnings.simplefilter("ignore")
        grads = torch.autograd.grad(probe.task_loss, params, allow_unused=True)
    return max((g.abs().max().item() for g in grads if g is not None), default=0.0)


def run_variant(variant: Variant, config, batch_fn, *, metrics, steps, device, dtype, lora, seed, fake) -> dict:
    fake_mode = None
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    model = build_model(config, variant, dtype=dtype, device=device, lora=lora, seed=seed, fake_mode=fake_mode)
    with ctx:
        batch = batch_fn()
    step = make_step(model, variant, batch)
    measured = "memory" in metrics or "flops" in metrics
    loss = task = aux = None
    if fake or (device.type == "cpu" and measured):
        # Gradients as training holds them after its first step. A warm-up step would cost as much as the
        # measured one (under fake tensors) or change nothing it measures (CPU: the step peak counts the step's
        # own allocations, which a first step does not change, the FLOPs are counted; the measured step warms the
        # timed ones up and gives the losses).
        with ctx:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
    else:
        # CUDA: a first step allocates workspaces and compiles kernels that would count in the step peak
        loss, task, aux = step()  # warm-up: gradients exist from here on, as in training
        model.zero_grad(set_to_none=False)
    row = {"variant": variant.name}
    decoders = set()
    if variant.lopt_mode is not None:
        decoders = {id(p) for p in patching.require_state(model).decoders.parameters()}
    # the model's own trainable parameters (without LoPT's aux decoders): the gradients training keeps
    row["trainable_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()
                                 if p.requires_grad and id(p) not in decoders)
    if variant.lopt_mode == "eager":
        # gradients eager mode holds from the bottom blocks' forward to the backward (in the step peak)
        row["held_bytes"] = block_hooks.held_gradient_bytes(patching.require_state(model))
    if measured:
        losses = []
        mem, flops = measure_step(lambda: losses.append(step()), model, device, memory="memory" in metrics,
                                  flops="flops" in metrics, fake_mode=fake_mode)
        if loss is None and not fake:
            loss, task, aux = losses[0]
        if mem is not None:
            row.update(params_bytes=mem.params, grads_bytes=mem.grads, step_peak_bytes=mem.step_peak)
        if flops is not None:
            row["flops"] = flops
        if not fake:
            model.zero_grad(set_to_none=False)
    if "time" in metrics:
        times = []
        for _ in range(steps):
            times.append(timed(step, device))
            model.zero_grad(set_to_none=False)
        row["step_s"] = statistics.median(times)
        row["tokens_per_s"] = batch["input_ids"].numel() / row["step_s"]
    if not fake:
        row.update(loss=loss.item(), task_loss=task.item(), aux_loss=None if aux is None else aux.item())
        if variant.lopt_mode is not None:
            row["bottom_task_grad_max"] = _bottom_task_grad_max(model, batch)
    del model
    return row
