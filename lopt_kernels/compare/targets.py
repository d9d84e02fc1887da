"""What ``lopt-kernels compare`` checks its rows against: ``Setup`` (the configuration that ran and its shape's
arithmetic), the ``CONDITIONS`` a target is set for, the slacks, ``Target``/``TARGETS`` and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import patching
from .variants import VARIANTS, build_model


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
    eager its held gradients (the row's held bytes), activation-free the block's input (its recompute seed, c) and,
    with checkpointing, one more c: the task gradient at the boundary, which autograd holds while the boundary's
    backward rebuilds the block, can then set the peak (the rebuild holds L_b x c of its own checkpoints, the top
    half's backward L_t x c plus the task loss's buffers; cpu-1b 2 x 512 fp32 LoRA 16: the peak is in the rebuild);
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
        if mode == "eager":
            kept = by.get(t.num, {}).get("held_bytes", 0)
        else:
            kept = setup.boundary_tensor_bytes * (2 if checkpointing else 1)
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
#   step peak  baseline - MEMORY_SHARE x (L_b x s [+ the logits, vs the reference]) + (held gradients | seed c
#              [+ the boundary's task gradient c, checkpointed]),
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


def ratio(by: dict, num: str, den: str, metric: str) -> float | None:
    if num in by and den in by and by[num].get(metric) is not None and by[den].get(metric):
        return by[num][metric] / by[den][metric]
    return None


def measurable_targets(rows: list[dict]) -> list[Target]:
    """The targets whose two variants both measured their metric, whatever the configuration."""
    by = {r["variant"]: r for r in rows}
    return [t for t in TARGETS if ratio(by, t.num, t.den, t.metric) is not None]


def target_checks(rows: list[dict], setup: Setup) -> list[tuple[Target, float, float]]:
    """(target, ratio, bound) for every target that applies to ``setup``, whose two variants measured its metric
    and whose bound the design's arithmetic gives here."""
    by = {r["variant"]: r for r in rows}
    checks = []
    for t in applicable_targets(setup):
        measured = ratio(by, t.num, t.den, t.metric)
        bound = None if measured is None else t.bound(setup, by, t)
        if bound is not None:
            checks.append((t, measured, bound))
    return checks


def target_text(t: Target, ratio: float, bound: float) -> str:
    return f"{METRIC_NAMES[t.metric]:9s} {t.num} / {t.den} = {ratio:.3f} (target <= {bound:.3f})"


def target_lines(rows: list[dict], setup: Setup) -> list[str]:
    lines = []
    for t, ratio, bound in target_checks(rows, setup):
        ok = "ok " if ratio <= bound else "miss"
        lines.append(f"  [{ok}] {target_text(t, ratio, bound)}")
    return lines


def targets_header(setup: Setup | None) -> str:
    whens = sorted({t.when for t in applicable_targets(setup)}, key=list(CONDITIONS).index)
    if not whens:
        return ""
    return f"targets that apply to this configuration, {CONDITIONS[whens[-1]][0]}:"
