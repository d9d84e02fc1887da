"""The output of ``lopt-kernels compare``: the table, the summary lines, the plot and the verdict."""

from __future__ import annotations

import textwrap

from .targets import Setup, ratio, target_checks, target_text
from .variants import CompareError

# The LoPT variants, each with the end-to-end variant at the same checkpointing (and fused task loss).
LOPT_BASELINES = {"lopt": "e2e+fce", "lopt-af": "e2e+fce", "lopt+ckpt": "e2e+ckpt+fce", "lopt-af+ckpt": "e2e+ckpt+fce"}


def mib(n):
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
            opt("aux_loss", "{:.3e}".format), delta, opt("params_bytes", mib), opt("grads_bytes", mib),
            opt("held_bytes", mib), opt("step_peak_bytes", mib), opt("flops", lambda f: f"{f / 1e12:.3f}"),
            opt("step_s", lambda s: f"{s * 1e3:.1f}"), opt("tokens_per_s", "{:,.0f}".format),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


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
            time_part = f", time {_x(ratio(by, name, base, 'step_s'))}" if timed_run else ""
            parts.append(f"{name} memory {_x(ratio(by, name, base, 'step_peak_bytes'))}, "
                         f"compute {_x(ratio(by, name, base, 'flops'))}{time_part}")
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
            against = (f" (step peak {_x(ratio(by, best['variant'], base['variant'], 'step_peak_bytes'))}, "
                       f"{'time' if timed_run else 'FLOPs'} {_x(ratio(by, best['variant'], base['variant'], speed))}"
                       f" of {base['variant']})")
        picks.append(f"{limit} the limit: {best['variant']}{against}")
    if picks:
        lines.append("  pick: " + "; ".join(picks))
    if lines:
        lines.insert(0, "LoPT against end-to-end at the same checkpointing (memory: step peak; compute: FLOPs; "
                        "time: median step):")
    missed = [(t, r, b) for t, r, b in (target_checks(rows, setup) if setup is not None else []) if r > b]
    if missed:
        lines.append("  LoPT MISSES its target here: " + "; ".join(" ".join(target_text(*m).split()) for m in missed))
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
