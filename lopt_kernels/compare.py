"""``lopt-kernels compare``: one training step end-to-end and one with LoPT, side by side."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from importlib import resources
from pathlib import Path

import torch

from . import patching
from .measure import step_peak_bytes, timed

PRESETS = ("tiny",)
VARIANTS = ("e2e", "lopt")


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
    except (ValueError, KeyError) as exc:
        raise CompareError(f"--config {name_or_path!r} is not a valid transformers config.json: {exc}") from None


def synthetic_batch(config, batch: int, seq: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : max(1, seq // 8)] = -100  # an untrained prompt prefix
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _bottom_params(model) -> list[torch.nn.Parameter]:
    state = patching._require_state(model)
    _, bottom = patching._top_and_bottom(state)
    decoders = {id(p) for p in state.decoders.parameters()}
    return [p for p in model.parameters() if id(p) in bottom and id(p) not in decoders and p.requires_grad]


def run_variant(variant: str, base_model, batch: dict, *, steps: int, device) -> dict:
    """Warm-up step, then ``steps`` timed steps and one memory-measured step of ``variant``."""
    model = copy.deepcopy(base_model)
    if variant == "lopt":
        patching.patch(model)
    model.train()

    def step():
        out = model(**batch)
        out.loss.backward()
        return out

    out = step()  # warm-up; allocates the gradients, which later steps accumulate into in place
    model.zero_grad(set_to_none=False)
    times = []
    for _ in range(steps):
        seconds, out = timed(step, device)
        times.append(seconds)
        model.zero_grad(set_to_none=False)
    peak, out = step_peak_bytes(step, device)
    tokens = batch["input_ids"].numel()
    row = {
        "variant": variant,
        "loss": out.loss.item(),
        "task_loss": (out.task_loss if "task_loss" in out else out.loss).item(),
        "aux_loss": out.aux_loss.item() if "aux_loss" in out else None,
        "step_s": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times),
        "activation_peak_bytes": peak,
    }
    if variant == "lopt":
        probe = model(**batch)
        bottom = _bottom_params(model)
        grads = torch.autograd.grad(probe.task_loss, bottom, allow_unused=True)
        row["bottom_task_grad_max"] = max((g.abs().max().item() for g in grads if g is not None), default=0.0)
    return row


def format_table(rows: list[dict]) -> str:
    header = ["variant", "loss", "task loss", "aux loss", "step ms", "tokens/s", "act. peak MiB", "vs e2e"]
    base_peak = next((r["activation_peak_bytes"] for r in rows if r["variant"] == "e2e"), None)
    lines = []
    for r in rows:
        ratio = f"{r['activation_peak_bytes'] / base_peak:.2f}x" if base_peak else "-"
        lines.append([
            r["variant"], f"{r['loss']:.4f}", f"{r['task_loss']:.4f}",
            "-" if r["aux_loss"] is None else f"{r['aux_loss']:.6f}", f"{r['step_s'] * 1e3:.1f}",
            f"{r['tokens_per_s']:.0f}", f"{r['activation_peak_bytes'] / 2**20:.1f}", ratio,
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def verdict(rows: list[dict]) -> str:
    by = {r["variant"]: r for r in rows}
    lopt, e2e = by.get("lopt"), by.get("e2e")
    if lopt is None:
        return "verdict: no lopt variant run"
    holds = lopt["bottom_task_grad_max"] == 0.0
    same_task = e2e is None or abs(lopt["task_loss"] - e2e["task_loss"]) <= 1e-4 * max(1.0, abs(e2e["task_loss"]))
    parts = [
        "gradient boundary holds: the bottom half got no task gradient" if holds
        else f"GRADIENT BOUNDARY BROKEN: task gradient {lopt['bottom_task_grad_max']:.3e} reached the bottom half",
        "task loss equals e2e" if same_task else "TASK LOSS DIFFERS FROM e2e",
    ]
    return "verdict: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="one training step end-to-end vs with LoPT: losses, time, memory")
    cmp.add_argument("--config", default="tiny", help=f"embedded preset ({', '.join(PRESETS)}) or a config.json path")
    cmp.add_argument("--batch", type=int, default=4)
    cmp.add_argument("--seq", type=int, default=256)
    cmp.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    cmp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    return parser


def compare_main(args) -> int:
    for flag in ("batch", "seq", "steps"):
        if getattr(args, flag) < 1:
            raise CompareError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    config = load_config(args.config)
    device = torch.device(args.device)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    batch = synthetic_batch(config, args.batch, args.seq, args.seed, device)
    text = config.get_text_config()
    print(f"lopt-kernels compare: {args.config} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
          f"vocab {text.vocab_size}), batch {args.batch} x seq {args.seq}, {device.type}", flush=True)
    rows = []
    for i, variant in enumerate(VARIANTS, 1):
        print(f"[{i}/{len(VARIANTS)}] {variant} ...", file=sys.stderr, flush=True)
        rows.append(run_variant(variant, base, batch, steps=args.steps, device=device))
    print(format_table(rows))
    print(verdict(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    return 0 if rows[-1]["bottom_task_grad_max"] == 0.0 else 1
