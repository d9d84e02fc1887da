"""``lopt-kernels compare``: training-step variants side by side: memory, FLOPs, time, losses.

Variants (each one optimiser-free training step, forward + backward):
  e2e            end-to-end, the model's own loss (logits materialised)
  e2e+fce        end-to-end with a fused linear cross-entropy (no logits)
  e2e+ckpt       end-to-end with gradient checkpointing
  e2e+ckpt+fce   both: what a Liger user runs today
  seed           the LoPT reference code: stored activations, one backward, the model's own loss
  seed+ckpt      the same with its gradient checkpointing
  lopt           this library, mode="eager": the bottom blocks learn during the forward (end-to-end
                 compute), fused task loss
  lopt+ckpt      the same with gradient checkpointing
  lopt-af        this library, mode="activation_free": the bottom blocks are rebuilt in the backward
                 (least memory, one more forward of the bottom half)
  lopt-af+ckpt   the same with gradient checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import json

import statistics
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import block_hooks, patching
from .measure import measure_step, timed
from .ops.linear_cross_entropy import linear_cross_entropy, shift_labels_of

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

# (numerator, denominator, metric, bound): the library's stated targets, checked when both ran.
TARGETS = (
    # eager: LoPT at end-to-end compute and time, with LoPT's memory
    ("lopt", "e2e+fce", "flops", 1.01),
    ("lopt", "e2e+fce", "step_s", 1.05),
    ("lopt", "e2e+fce", "step_peak_bytes", 0.55),
    ("lopt+ckpt", "e2e+ckpt+fce", "flops", 1.01),
    ("lopt+ckpt", "e2e+ckpt+fce", "step_s", 1.05),
    ("lopt+ckpt", "e2e+ckpt+fce", "step_peak_bytes", 0.85),
    # activation-free: least memory, for one more forward of the bottom half
    ("lopt-af+ckpt", "seed+ckpt", "step_peak_bytes", 0.35),
    ("lopt-af+ckpt", "e2e+ckpt+fce", "step_peak_bytes", 0.85),
    ("lopt-af+ckpt", "e2e+ckpt", "flops", 1.13),
    ("lopt-af", "e2e+fce", "step_peak_bytes", 0.55),
    ("lopt-af", "e2e", "flops", 1.2),
)
METRIC_NAMES = {"step_peak_bytes": "step peak", "flops": "FLOPs", "step_s": "step time"}


class CompareError(Exception):
    """A bad command line; reported in one line with exit code 2."""


def load_config(name_or_path: str):
    """A transformers config from an embedded preset name or a ``config.json`` path."""
    from transformers import AutoConfig  # noqa: PLC0415

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
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CompareError(f"--config {name_or_path!r} is not a valid transformers config.json: {exc!r}") from None


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


def build_model(config, variant: Variant, *, dtype, device, lora: int, seed: int, fake_mode=None):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    with torch.device("meta") if fake_mode is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=_attn_implementation(config), dtype=dtype)
        if device.type != "cpu":
            model.to(device)
        model.config.use_cache = False
        if lora:
            from peft import LoraConfig, get_peft_model  # noqa: PLC0415

            model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear",
                                                     lora_dropout=0.0))
        if variant.lopt_mode is not None:
            patching.patch(model, mode=variant.lopt_mode, fused_ce="auto" if variant.fused_ce else "off")
    if fake_mode is not None:
        _fake_from_meta(model, fake_mode)
    if variant.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_step(model, variant: Variant, batch: dict):
    """A closure running one forward + backward of ``variant``; returns (loss, task_loss, aux_loss)."""
    lm = patching._unwrap(model)
    if variant.lopt_mode is None and variant.fused_ce:
        backbone = lm.base_model
        head = lm.get_output_embeddings()
        softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)

        def step():
            hidden = backbone(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
            loss = linear_cross_entropy(hidden, head.weight, shift_labels_of(batch["labels"]), bias=head.bias,
                                        softcap=softcap)
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
    state = patching._require_state(model)
    _, bottom = patching._top_and_bottom(state)
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
    if fake:
        # Gradients as training holds them after its first step (a warm-up step would cost as much
        # as the measured one under fake tensors).
        with ctx:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        loss = task = aux = None
    else:
        loss, task, aux = step()  # warm-up: gradients exist from here on, as in training
        model.zero_grad(set_to_none=False)
    row = {"variant": variant.name}
    if variant.lopt_mode == "eager":
        # gradients eager mode holds from the bottom blocks' forward to the backward (in the step peak)
        row["held_bytes"] = block_hooks.held_gradient_bytes(patching._require_state(model))
    if "memory" in metrics or "flops" in metrics:
        mem, flops = measure_step(step, model, device, memory="memory" in metrics, flops="flops" in metrics,
                                  fake_mode=fake_mode)
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


def target_lines(rows: list[dict]) -> list[str]:
    by = {r["variant"]: r for r in rows}
    lines = []
    for num, den, metric, bound in TARGETS:
        if num in by and den in by and by[num].get(metric) is not None and by[den].get(metric):
            ratio = by[num][metric] / by[den][metric]
            ok = "ok " if ratio <= bound else "miss"
            lines.append(f"  [{ok}] {METRIC_NAMES[metric]:9s} {num} / {den} = {ratio:.3f} (target <= {bound})")
    return lines


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-kernels", description="LoPT kernels: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="training-step variants side by side: memory, FLOPs, time, losses",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmp.add_argument("--config", default="tiny", help=f"embedded preset ({', '.join(PRESETS)}) or a config.json path")
    cmp.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    cmp.add_argument("--batch", type=int, default=2)
    cmp.add_argument("--seq", type=int, default=256)
    cmp.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    cmp.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA adapters of rank R on every linear layer, "
                     "frozen base (PEFT)")
    cmp.add_argument("--fake", action="store_true", help="estimate memory and FLOPs under FakeTensorMode, allocating "
                     "nothing (any model size on a laptop); time is not available")
    cmp.add_argument("--metrics", default=None, help="comma-separated from memory, flops, time "
                     "(default: all; memory,flops with --fake)")
    cmp.add_argument("--steps", type=int, default=None, help="timed steps per variant, median reported (default 3)")
    cmp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
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
    lora = f", LoRA r={args.lora}" if args.lora else ""
    print(f"lopt-kernels compare: {args.config} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
          f"vocab {text.vocab_size}), batch {args.batch} x seq {args.seq}, {args.dtype}{lora}, {mode}", flush=True)
    rows = []
    from tqdm.auto import tqdm  # noqa: PLC0415

    progress = tqdm(variants, desc="compare", unit="variant", file=sys.stderr, disable=None)
    patch_ctx = _no_packed_sequence_detection() if args.fake else contextlib.nullcontext()
    with patch_ctx:
        for name in progress:
            progress.set_postfix_str(name)
            rows.append(run_variant(VARIANTS[name], config, batch_fn, metrics=metrics, steps=steps, device=device,
                                    dtype=dtype, lora=args.lora, seed=args.seed, fake=args.fake))
    progress.close()
    print(format_table(rows))
    checks = target_lines(rows)
    if checks:
        print("targets (set for LoRA on a frozen base at scale, where activations dominate, e.g. "
              "--config cpu-1b --seq 1024 --lora 16; a tiny full fine-tune is dominated by embeddings):")
        print("\n".join(checks))
    print(verdict(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    broken = any(r.get("bottom_task_grad_max", 0.0) != 0.0 for r in rows)
    return 1 if broken else 0


__all__ = ["CompareError", "VARIANTS", "build_parser", "compare_main", "load_config"]
