"""``lopt-kernels compare``: training-step variants side by side: memory, FLOPs, time, losses.

Variants (each one optimiser-free training step, forward + backward):
  e2e            end-to-end, the model's own loss (logits materialised)
  e2e+fce        end-to-end with a fused linear cross-entropy (no logits), called as its users call it: the
                 unpatched backbone, then torch's torch.nn.functional.linear_cross_entropy(h, lm_head.weight,
                 labels, options=torch.nn.LinearCrossEntropyOptions()) on CPU, Liger's
                 LigerFusedLinearCrossEntropyLoss on CUDA (what use_liger_kernel patches in)
  e2e+ckpt       end-to-end with gradient checkpointing, the model's own loss
  e2e+ckpt+fce   both: what a Liger user runs today
  seed           the LoPT reference code: stored activations, one backward, the model's own loss
  seed+ckpt      the same with its gradient checkpointing
  lopt           this library, mode="eager": the bottom blocks learn during the forward (end-to-end
                 compute), fused task loss
  lopt+ckpt      the same with gradient checkpointing
  lopt-af        this library, mode="activation_free": the bottom blocks are rebuilt in the backward
                 (least memory, one more forward of the bottom half)
  lopt-af+ckpt   the same with gradient checkpointing

Without flags it runs the embedded ``tiny`` preset on its own shape: llama3-8b at 1/16 width (same
depth), batch 1 x seq 256, bf16, LoRA r=1 on a frozen base: the memory and FLOP proportions of
``--config llama3-8b --seq 4096 --batch 1 --dtype bf16 --lora 16`` in about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import statistics
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from . import block_hooks, patching
from .discovery import unwrap_causal_lm
from .measure import measure_step, timed
from .ops.linear_cross_entropy import resolve_implementation, shift_labels_of

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


@dataclass(frozen=True)
class Setup:
    """What a target's condition and bound look at: the configuration that ran, and its shape's arithmetic."""

    lora: int  # LoRA rank on a frozen base; 0: full fine-tune
    trainable_bytes: int | None = None  # the trainable parameters' bytes (their gradients'), end-to-end
    boundary_bytes: int | None = None  # layer-boundary activations: layers x batch x seq x hidden x dtype size
    layers: int | None = None  # decoder layers, L
    bottom_layers: int | None = None  # the layers of the non-final block(s), L_b (L - L // 2 at the midpoint)
    bottom_forward_flops: int | None = None  # one forward of those layers, F_b (None: not derivable, e.g. MoE)
    aux_flops: int | None = None  # the aux decoders' forward + backward, A

    @property
    def activations_dominate(self) -> bool:
        return (self.lora > 0 and self.trainable_bytes is not None and self.boundary_bytes is not None
                and self.trainable_bytes <= self.boundary_bytes)

    @property
    def boundary_tensor_bytes(self) -> float | None:
        """c: one B x T x h hidden state, what a checkpointed layer keeps."""
        return None if self.boundary_bytes is None or not self.layers else self.boundary_bytes / self.layers


# name: (what it means, in words; whether a Setup meets it)
CONDITIONS = {
    "any": ("any configuration", lambda s: True),
    "lora": ("LoRA on a frozen base", lambda s: s.lora > 0),
    # the same rule as mode="auto" choosing eager: the held gradients are no larger than the activations
    "lora_activations": ("LoRA on a frozen base where activations dominate (trainable gradients <= the "
                         "layer-boundary activations)", lambda s: s.activations_dominate),
}


FLOP_SLACK = 0.005  # FLOP ratios: ops the count below leaves out (none on the presets: they match exactly)
MEMORY_SHARE = 0.95  # step peaks: LoPT must save at least this share of the bytes the design saves
TIME_SLACK = 0.04  # step time: timing noise on top of the FLOP ratio (eager runs its baseline's FLOPs)


def _peak(by: dict, name: str):
    return by.get(name, {}).get("step_peak_bytes")


def _extra_flops(recomputes: bool):
    """FLOPs: LoPT = baseline + the aux decoders' forward and backward (A) + for activation-free one more forward
    of the bottom block's layers and of its aux decoder (F_b + A / 3: its forward gives the aux loss's value, the
    rebuild in the backward runs both again, with gradients). Bound: (baseline + extra) / baseline + FLOP_SLACK."""

    def bound(setup: Setup, by: dict, t: Target) -> float | None:
        base = by.get(t.den, {}).get("flops")
        if not base or setup.aux_flops is None or (recomputes and setup.bottom_forward_flops is None):
            return None
        extra = setup.aux_flops + (setup.bottom_forward_flops + setup.aux_flops / 3 if recomputes else 0)
        return (base + extra) / base + FLOP_SLACK

    return bound


def _time_of_flops(setup: Setup, by: dict, t: Target) -> float | None:
    """Step time: eager runs its baseline's FLOPs (plus the aux decoders'), so its time may exceed the FLOP ratio
    by timing noise only."""
    flops = _extra_flops(False)(setup, by, t)
    return None if flops is None else flops - FLOP_SLACK + TIME_SLACK


def _stored_per_layer(setup: Setup, by: dict, checkpointing: bool) -> float | None:
    """s: what end-to-end keeps per layer for its backward. With per-layer checkpointing one boundary tensor (c);
    without, the difference of the two end-to-end peaks spread over the layers, plus c."""
    c = setup.boundary_tensor_bytes
    if c is None or checkpointing:
        return c
    full, ckpt = _peak(by, "e2e+fce"), _peak(by, "e2e+ckpt+fce")
    return None if full is None or ckpt is None else (full - ckpt) / setup.layers + c


def _peak_saving(mode: str, checkpointing: bool, logits: bool = False):
    """Step peak: LoPT = baseline - what the bottom block no longer keeps (L_b x s) + what the mode keeps instead:
    eager its held gradients (the row's held bytes), activation-free the block's input (its recompute seed, c);
    against the reference code (``logits``) also minus the logits the fused task loss never materialises
    (e2e+ckpt's peak - e2e+ckpt+fce's). Bound: (baseline - MEMORY_SHARE x saving + kept) / baseline."""

    def bound(setup: Setup, by: dict, t: Target) -> float | None:
        base, s = _peak(by, t.den), _stored_per_layer(setup, by, checkpointing)
        if not base or s is None or setup.bottom_layers is None:
            return None
        saving = setup.bottom_layers * s
        if logits:
            own, fused = _peak(by, "e2e+ckpt"), _peak(by, "e2e+ckpt+fce")
            if own is None or fused is None:
                return None
            saving += own - fused
        kept = by.get(t.num, {}).get("held_bytes", 0) if mode == "eager" else setup.boundary_tensor_bytes
        return (base - MEMORY_SHARE * saving + kept) / base

    return bound


@dataclass(frozen=True)
class Target:
    num: str
    den: str
    metric: str
    bound: Callable[[Setup, dict, "Target"], float | None]  # the design's arithmetic; None: not derivable here
    when: str  # a CONDITIONS key: the configurations the target is set for


# The library's targets, each the design's arithmetic on the configuration that ran (Setup: the model's shape,
# read from the model built on the meta device; the measured rows: the baselines), with a stated slack. Checked
# when both variants ran, the bound can be derived, and the configuration meets ``when``.
#   FLOPs      eager: baseline + A (the aux decoders' six h x r products: 12 N h r per non-final block);
#              activation-free: + F_b + A / 3, one more forward of the bottom block's layers (2 N in out per Linear,
#              LoRA adapters included, + 4 B H T^2 d per attention, as torch counts them) and of its aux decoder;
#              + FLOP_SLACK (checkpointing's recomputation stops early and computes layer 0's input gradient for
#              end-to-end only: within 0.1% on the presets).
#   step time  eager: its FLOP ratio + TIME_SLACK (LoRA: the held gradients are tiny, nothing extra to scale).
#   step peak  baseline - MEMORY_SHARE x (L_b x s [+ the logits, vs the reference]) + (held gradients | seed c),
#              s = c with checkpointing, else (P(e2e+fce) - P(e2e+ckpt+fce)) / L + c.
# On the default run (tiny, 1 x 256, bf16, LoRA 1: L_b = 16 of 32, F_b / e2e = 0.213) these come to about
# 1.005 / 1.218 / 1.156 for the FLOPs, 0.55 / 0.86 for eager's peaks and 0.55 / 0.87 for activation-free's.
TARGETS = (
    Target("lopt", "e2e+fce", "flops", _extra_flops(False), "any"),
    Target("lopt", "e2e+fce", "step_s", _time_of_flops, "lora"),
    Target("lopt", "e2e+fce", "step_peak_bytes", _peak_saving("eager", False), "lora_activations"),
    Target("lopt+ckpt", "e2e+ckpt+fce", "flops", _extra_flops(False), "any"),
    Target("lopt+ckpt", "e2e+ckpt+fce", "step_s", _time_of_flops, "lora"),
    Target("lopt+ckpt", "e2e+ckpt+fce", "step_peak_bytes", _peak_saving("eager", True), "lora_activations"),
    Target("lopt-af+ckpt", "seed+ckpt", "step_peak_bytes", _peak_saving("activation_free", True, logits=True),
           "lora_activations"),
    Target("lopt-af+ckpt", "e2e+ckpt+fce", "step_peak_bytes", _peak_saving("activation_free", True),
           "lora_activations"),
    Target("lopt-af+ckpt", "e2e+ckpt", "flops", _extra_flops(True), "any"),
    Target("lopt-af", "e2e+fce", "step_peak_bytes", _peak_saving("activation_free", False), "lora_activations"),
    Target("lopt-af", "e2e", "flops", _extra_flops(True), "any"),
)
METRIC_NAMES = {"step_peak_bytes": "step peak", "flops": "FLOPs", "step_s": "step time"}
# The LoPT variants, each with the end-to-end variant at the same checkpointing (and fused task loss).
LOPT_BASELINES = {"lopt": "e2e+fce", "lopt-af": "e2e+fce", "lopt+ckpt": "e2e+ckpt+fce", "lopt-af+ckpt": "e2e+ckpt+fce"}
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
def _no_packed_sequence_detection():
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

    weight, bias = head.weight, head.bias
    labels = shift_labels.reshape(-1)
    if weight.device.type == "cuda":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: PLC0415

        loss_fn = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
        return lambda hidden: loss_fn(weight, hidden.reshape(-1, hidden.shape[-1]), labels, bias)
    if resolve_implementation("auto", weight.device, softcap) is None:
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


def _mib(n):
    return f"{n / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    header = ["variant", "loss", "task loss", "aux loss", "Δtask vs e2e", "params MiB", "grads MiB", "held MiB",
              "step peak MiB", "TFLOPs", "step ms", "tokens/s"]
    base_task = next((r.get("task_loss") for r in rows if r["variant"] == "e2e"), None)
    lines = []
    for r in rows:
        def opt(key, fmt):
            return "-" if r.get(key) is None else fmt(r[key])

        delta = "-" if base_task is None or r.get("task_loss") is None else f"{abs(r['task_loss'] - base_task):.1e}"
        lines.append([
            r["variant"], opt("loss", "{:.4f}".format), opt("task_loss", "{:.4f}".format),
            opt("aux_loss", "{:.3e}".format), delta, opt("params_bytes", _mib), opt("grads_bytes", _mib),
            opt("held_bytes", _mib), opt("step_peak_bytes", _mib), opt("flops", lambda f: f"{f / 1e12:.3f}"),
            opt("step_s", lambda s: f"{s * 1e3:.1f}"), opt("tokens_per_s", "{:,.0f}".format),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def setup_of(config, *, batch: int, seq: int, dtype, lora: int, rows: list[dict]) -> Setup:
    """The configuration that ran, as target conditions and bounds see it."""
    text = config.get_text_config()
    trainable = [r["trainable_bytes"] for r in rows if r.get("trainable_bytes") is not None]
    boundary = text.num_hidden_layers * batch * seq * text.hidden_size * torch.empty((), dtype=dtype).element_size()
    return Setup(lora=lora, trainable_bytes=min(trainable) if trainable else None, boundary_bytes=boundary,
                 **design_counts(config, batch=batch, seq=seq, dtype=dtype, lora=lora))


def design_counts(config, *, batch: int, seq: int, dtype, lora: int) -> dict:
    """The FLOP arithmetic of the targets, read from the model's shape: the model built as compare builds it
    (LoRA adapters included) on the meta device (nothing allocated) and patched at the midpoint. ``layers``,
    ``bottom_layers`` (the non-final blocks' layers, L_b), ``bottom_forward_flops`` (F_b: 2 N in out per
    ``nn.Linear`` in those layers + 4 B H T^2 d per attention, as torch's FLOP counter counts a forward; None when a
    layer keeps weights outside ``nn.Linear``, as mixture-of-experts layers do, whose per-token cost depends on
    routing) and ``aux_flops`` (A: the aux decoders' two h x r products, their input and weight gradients:
    12 N h r per non-final block)."""
    text = config.get_text_config()
    model = build_model(config, VARIANTS["lopt-af"], dtype=dtype, device=torch.device("cpu"), lora=lora, seed=0,
                        meta=True)
    state = patching.require_state(model)
    tokens = batch * seq
    bottom = [i for b in range(len(state.decoders)) for i in state.block_range(b)]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    flops = 0
    for i in bottom:
        layer = state.layers[i]
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        in_linears = {id(p) for m in linears for p in m.parameters(recurse=False)}
        if any(p.dim() >= 2 and id(p) not in in_linears for p in layer.parameters()):
            flops = None
            break
        flops += sum(2 * tokens * m.in_features * m.out_features for m in linears)
        flops += 4 * batch * heads * seq * seq * head_dim
    aux = sum(12 * tokens * d.down.in_features * d.down.out_features for d in state.decoders)
    return {"layers": len(state.layers), "bottom_layers": len(bottom), "bottom_forward_flops": flops,
            "aux_flops": aux}


def applicable_targets(setup: Setup | None) -> list[Target]:
    """The targets set for ``setup`` (all of them when ``setup`` is None)."""
    return [t for t in TARGETS if setup is None or CONDITIONS[t.when][1](setup)]


def _ratio(by: dict, num: str, den: str, metric: str) -> float | None:
    if num in by and den in by and by[num].get(metric) is not None and by[den].get(metric):
        return by[num][metric] / by[den][metric]
    return None


def measurable_targets(rows: list[dict]) -> list[Target]:
    """The targets whose two variants both measured their metric, whatever the configuration."""
    by = {r["variant"]: r for r in rows}
    return [t for t in TARGETS if _ratio(by, t.num, t.den, t.metric) is not None]


def target_checks(rows: list[dict], setup: Setup) -> list[tuple[Target, float, float]]:
    """(target, ratio, bound) for every target that applies to ``setup``, whose two variants measured its metric
    and whose bound the design's arithmetic gives here."""
    by = {r["variant"]: r for r in rows}
    checks = []
    for t in applicable_targets(setup):
        ratio = _ratio(by, t.num, t.den, t.metric)
        bound = None if ratio is None else t.bound(setup, by, t)
        if bound is not None:
            checks.append((t, ratio, bound))
    return checks


def _target_text(t: Target, ratio: float, bound: float) -> str:
    return f"{METRIC_NAMES[t.metric]:9s} {t.num} / {t.den} = {ratio:.3f} (target <= {bound:.3f})"


def target_lines(rows: list[dict], setup: Setup) -> list[str]:
    lines = []
    for t, ratio, bound in target_checks(rows, setup):
        ok = "ok " if ratio <= bound else "miss"
        lines.append(f"  [{ok}] {_target_text(t, ratio, bound)}")
    return lines


def targets_header(setup: Setup | None) -> str:
    whens = sorted({t.when for t in applicable_targets(setup)}, key=list(CONDITIONS).index)
    if not whens:
        return ""
    return f"targets that apply to this configuration, {CONDITIONS[whens[-1]][0]}:"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_lines(rows: list[dict], setup: Setup | None = None) -> list[str]:
    """Three lines in words: LoPT against end-to-end at the same checkpointing (memory, compute, time),
    then which LoPT variant to pick when memory is the limit and when time is; a fourth when a target
    that applies here is missed."""
    by = {r["variant"]: r for r in rows}
    timed_run = any(r.get("step_s") is not None for r in rows)
    speed = "step_s" if timed_run else "flops"
    lines = []
    for ckpt, label in ((False, "without checkpointing"), (True, "with checkpointing")):
        base = "e2e+ckpt+fce" if ckpt else "e2e+fce"
        parts = []
        for name in LOPT_BASELINES:
            if ("+ckpt" in name) != ckpt or name not in by or base not in by:
                continue
            time_part = f", time {_x(_ratio(by, name, base, 'step_s'))}" if timed_run else ""
            parts.append(f"{name} memory {_x(_ratio(by, name, base, 'step_peak_bytes'))}, "
                         f"compute {_x(_ratio(by, name, base, 'flops'))}{time_part}")
        if parts:
            lines.append(f"  {label} (vs {base}): " + " | ".join(parts))
    lopt = [r for r in rows if r["variant"] in LOPT_BASELINES]
    base = by.get("e2e") or next((r for r in rows if r["variant"].startswith("e2e")), None)
    picks = []
    for limit, key in (("memory", "step_peak_bytes"), ("time" if timed_run else "compute (no time under --fake)", speed)):
        measured = [r for r in lopt if r.get(key) is not None]
        if not measured:
            continue
        best = min(measured, key=lambda r: r[key])
        against = ""
        if base is not None:
            against = (f" (step peak {_x(_ratio(by, best['variant'], base['variant'], 'step_peak_bytes'))}, "
                       f"{'time' if timed_run else 'FLOPs'} {_x(_ratio(by, best['variant'], base['variant'], speed))}"
                       f" of {base['variant']})")
        picks.append(f"{limit} the limit: {best['variant']}{against}")
    if picks:
        lines.append("  pick: " + "; ".join(picks))
    if lines:
        lines.insert(0, "LoPT against end-to-end at the same checkpointing (memory: step peak; compute: FLOPs; "
                        "time: median step):")
    missed = [(t, r, b) for t, r, b in (target_checks(rows, setup) if setup is not None else []) if r > b]
    if missed:
        lines.append("  LoPT MISSES its target here: " + "; ".join(" ".join(_target_text(*m).split()) for m in missed))
    return lines


def write_plot(rows: list[dict], path, title: str) -> None:
    """A PNG of step peak memory against step time (FLOPs where no time was measured), one labelled
    point per variant, the Pareto front (no other variant both lighter and faster) drawn."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: F401, PLC0415

    timed_run = all(r.get("step_s") is not None for r in rows)
    xkey, xlabel, xscale = (("step_s", "step time (ms, median)", 1e3) if timed_run
                            else ("flops", "TFLOPs per step (forward + backward)", 1e-12))
    points = [(r["variant"], r[xkey] * xscale, r["step_peak_bytes"] / 2**20) for r in rows
              if r.get(xkey) is not None and r.get("step_peak_bytes") is not None]
    if not points:
        raise CompareError("--plot needs step peak memory and step time or FLOPs: keep memory and time/flops in --metrics")
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colours = {"e2e": "tab:gray", "seed": "tab:orange", "lopt": "tab:green"}
    for name, x, y in points:
        family = "lopt" if name.startswith("lopt") else name.split("+")[0]
        ax.scatter([x], [y], s=60 if family == "lopt" else 40, color=colours.get(family, "tab:blue"), zorder=3,
                   marker="o" if family == "lopt" else "s",
                   label={"e2e": "end-to-end", "seed": "LoPT reference code", "lopt": "lopt-kernels"}.get(family)
                   if name == family else None)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.{0 if v >= 1 else 1}f}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(x=0.12, y=0.12)
    fig.canvas.draw()
    placed = []  # display boxes of the labels so far: move a label down until it overlaps none
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = ax.transData.transform((x, y))
        dy = 4
        width = 6.5 * len(name)
        while any(abs(px + 6 - qx) < max(width, qw) and abs(py + dy - qy) < 11 for qx, qy, qw in placed):
            dy -= 11
        placed.append((px + 6, py + dy, width))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, dy * 72 / fig.dpi), fontsize=9)
    front, lowest = [], float("inf")
    for name, x, y in sorted(points, key=lambda p: (p[1], p[2])):
        if y < lowest:
            front.append((x, y))
            lowest = y
    if len(front) > 1:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:green", alpha=0.5, zorder=2,
                label="Pareto front (nothing both lighter and faster)")
    ax.legend(loc="upper right", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("step peak memory, MiB (activations, temporaries; log scale)")
    ax.set_title(textwrap.fill(title, 100), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def verdict(rows: list[dict]) -> str:
    lopt_rows = [r for r in rows if "bottom_task_grad_max" in r]
    if not lopt_rows:
        return "verdict: no LoPT variant with real tensors ran; the boundary was not checked"
    broken = [r for r in lopt_rows if r["bottom_task_grad_max"] != 0.0]
    base = next((r for r in rows if r["variant"] == "e2e"), None)
    parts = []
    if broken:
        parts.append("GRADIENT BOUNDARY BROKEN in " + ", ".join(
            f"{r['variant']} (task gradient {r['bottom_task_grad_max']:.2e} reached the bottom half)" for r in broken))
    else:
        parts.append("gradient boundary holds: the bottom half got no task gradient")
    if base is not None:
        off = [r["variant"] for r in rows if r.get("task_loss") is not None
               and abs(r["task_loss"] - base["task_loss"]) > 2e-3 * max(1.0, abs(base["task_loss"]))]
        parts.append("task loss equals e2e" if not off else f"TASK LOSS DIFFERS FROM e2e in {', '.join(off)}")
    return "verdict: " + "; ".join(parts)


class _Progress:
    """Progress on stderr while the variants run: a tqdm bar on a terminal, else one line per variant
    as it finishes (logs, CI, pipes)."""

    def __init__(self, variants: list[str]):
        self.total = len(variants)
        self.count = 0
        self.bar = None
        self.started = 0.0
        if sys.stderr.isatty():
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=self.total, desc="compare", unit="variant", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def start(self, name: str) -> None:
        self.started = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self, name: str, row: dict) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        seconds = time.perf_counter() - self.started
        peak = "" if row.get("step_peak_bytes") is None else f", step peak {_mib(row['step_peak_bytes'])} MiB"
        print(f"compare [{self.count}/{self.total}] {name} done in {seconds:.1f} s{peak}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-kernels", description="LoPT kernels: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="training-step variants side by side: memory, FLOPs, time, losses",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmp.add_argument("--config", default="tiny", help=f"embedded preset ({', '.join(PRESETS)}) or a config.json path")
    cmp.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    cmp.add_argument("--batch", type=int, default=None, help="default: the config's own (tiny: 1), else 2")
    cmp.add_argument("--seq", type=int, default=None, help="default: the config's own (tiny: 256), else 256")
    cmp.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: the config's own (tiny: bf16), "
                     "else fp32")
    cmp.add_argument("--lora", type=int, default=None, metavar="R", help="LoRA adapters of rank R on every linear "
                     "layer, frozen base (PEFT); 0: full fine-tune (default: the config's own (tiny: 1), else 0)")
    cmp.add_argument("--fake", action="store_true", help="estimate memory and FLOPs under FakeTensorMode, allocating "
                     "nothing (any model size on a laptop); time is not available")
    cmp.add_argument("--metrics", default=None, help="comma-separated from memory, flops, time "
                     "(default: all; memory,flops with --fake)")
    cmp.add_argument("--steps", type=int, default=None, help="timed steps per variant, median reported (default 3)")
    cmp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    cmp.add_argument("--plot", dest="plot_path", metavar="PATH", help="also write a PNG of step peak memory against "
                     "step time (FLOPs under --fake), Pareto front drawn; needs matplotlib: pip install "
                     "'lopt-kernels[plot]'")
    return parser


def _parse(args):
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise CompareError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    metrics = ["memory", "flops"] if args.fake else list(METRICS)
    if args.metrics is not None:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise CompareError(f"--metrics: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METRICS)}")
    if args.fake and "time" in metrics:
        raise CompareError("--fake allocates and computes nothing, so it cannot measure time: drop 'time' from --metrics")
    if args.fake and args.steps is not None:
        raise CompareError("--steps times real steps; it has no meaning with --fake")
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise CompareError("--plot needs matplotlib: pip install 'lopt-kernels[plot]'") from None
    for key, value in run_defaults(args.config).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype not in DTYPES:
        raise CompareError(f"--dtype {args.dtype!r} (from --config {args.config!r}) is not one of {', '.join(DTYPES)}")
    for flag in ("batch", "seq"):
        if getattr(args, flag) < 1:
            raise CompareError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 1:
        raise CompareError(f"--steps must be >= 1, got {args.steps}")
    if args.lora < 0:
        raise CompareError(f"--lora must be >= 0, got {args.lora}")
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.fake else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise CompareError(f"--device {device!r} is not available here (cpu{', cuda' if torch.cuda.is_available() else ''})")
    if args.fake and device != "cpu":
        raise CompareError("--fake runs on fake CPU tensors; drop --device")
    return variants, metrics, torch.device(device)


def compare_main(args) -> int:
    variants, metrics, device = _parse(args)
    config = load_config(args.config)
    text = config.get_text_config()
    dtype = DTYPES[args.dtype]
    steps = args.steps or 3

    def batch_fn():
        return synthetic_batch(config, args.batch, args.seq, args.seed, device)

    mode = "fake tensors (estimate)" if args.fake else device.type
    lora = f", LoRA r={args.lora} (frozen base)" if args.lora else ", full fine-tune"
    run_title = (f"{Path(args.config).name} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
                 f"vocab {text.vocab_size}), batch {args.batch} x seq {args.seq}, {args.dtype}{lora}, {mode}")
    print(f"lopt-kernels compare: {args.config} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
          f"vocab {text.vocab_size}), batch {args.batch} x seq {args.seq}, {args.dtype}{lora}, {mode}", flush=True)
    rows = []
    patch_ctx = _no_packed_sequence_detection() if args.fake else contextlib.nullcontext()
    with patch_ctx, _Progress(variants) as progress:
        for name in variants:
            progress.start(name)
            rows.append(run_variant(VARIANTS[name], config, batch_fn, metrics=metrics, steps=steps, device=device,
                                    dtype=dtype, lora=args.lora, seed=args.seed, fake=args.fake))
            progress.done(name, rows[-1])
    setup = setup_of(config, batch=args.batch, seq=args.seq, dtype=dtype, lora=args.lora, rows=rows)
    summary = summary_lines(rows, setup)
    if summary:
        print("\n".join(summary))
    print(format_table(rows))
    checks = target_lines(rows, setup)
    if checks:
        print(targets_header(setup))
        print("\n".join(checks))
    elif measurable_targets(rows):
        print("targets: none applies to this configuration (they are set for "
              + "; ".join(desc for key, (desc, _) in CONDITIONS.items() if key != "any") + ")")
    print(verdict(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    if args.plot_path:
        write_plot(rows, args.plot_path, title=f"lopt-kernels compare: {run_title}")
        print(f"plot: {args.plot_path}")
    broken = any(r.get("bottom_task_grad_max", 0.0) != 0.0 for r in rows)
    return 1 if broken else 0


__all__ = ["CompareError", "TARGETS", "VARIANTS", "build_parser", "compare_main", "load_config", "run_defaults",
           "summary_lines", "target_lines", "write_plot"]
