"""The learning-forgetting protocol of examples/retention.py, free of any model: flip counting, seed
aggregation, Pareto fronts, front dominance (with a noise margin) and the sweep driver.

A *point* is one (method, learning rate) configuration, its metrics averaged over seeds:
``{"method", "lr", "task": {"mean", "std", "n"}, "forget": {"mean", "std", "n"}, ...}``. The task metric is
oriented so that higher is better (a loss is negated by ``aggregate``); forgetting is lower-is-better.

Point a *dominates* point b when a is at least as good on both axes and strictly better on one. Across seeds
"at least as good" and "strictly better" are judged against a noise margin: ``margin`` standard errors of the
difference of the two means (``z * sqrt(sa^2/na + sb^2/nb)``, per axis). Method A's front *dominates* method
B's when every point of B's front is dominated by some point of A's front: no worse on either axis beyond the
margin and better on at least one beyond it. (Asking only one point of B's front to be beaten lets seed noise
through: with a few seeds and several learning rates some difference exceeds any fixed margin by chance.) Fronts that cross, or that agree within noise, come out as "neither": nothing is claimed.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Iterable, Sequence


def count_flips(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """Per-example correctness before and after post-training (same examples, same order): ``lost`` = right
    before and wrong after (1 -> 0), ``gained`` = wrong before and right after (0 -> 1), ``right_before``,
    ``right_after``, ``n``, and ``lost_share`` = lost / right_before (0 when nothing was right)."""
    if len(before) != len(after):
        raise ValueError(f"count_flips: {len(before)} examples before, {len(after)} after")
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    right_before = sum(1 for b in before if b)
    return {"lost": lost, "gained": gained, "right_before": right_before,
            "right_after": sum(1 for a in after if a), "n": len(before),
            "lost_share": lost / right_before if right_before else 0.0}


def mean_std(values: Iterable[float]) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def aggregate(runs: list[dict], task_key: str, forget_key: str, higher_is_better: bool = True,
              extra: Sequence[str] = ()) -> list[dict]:
    """One point per (method, lr): the seed mean/std/n of ``task_key`` (negated when lower is better, so the
    point's ``task`` is always higher-is-better) and of ``forget_key``, plus the mean/std of ``extra`` keys."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    sign = 1.0 if higher_is_better else -1.0
    points = []
    for (method, lr), rs in groups.items():
        p = {"method": method, "lr": lr, "seeds": sorted(r["seed"] for r in rs),
             "task": mean_std(sign * r[task_key] for r in rs if r.get(task_key) is not None),
             "forget": mean_std(r[forget_key] for r in rs)}
        for key in extra:
            p[key] = mean_std(r.get(key) for r in rs)
        points.append(p)
    return sorted(points, key=lambda p: (p["method"], p["lr"]))


def _margin(a: dict, b: dict, z: float) -> float:
    if z <= 0:
        return 0.0
    var = (a["std"] ** 2) / max(a["n"], 1) + (b["std"] ** 2) / max(b["n"], 1)
    return z * math.sqrt(var)


def compare_points(a: dict, b: dict, z: float = 0.0) -> dict:
    """Per axis, is a better (``+1``), worse (``-1``) or the same within ``z`` standard errors (``0``)?"""
    out = {}
    for axis, sign in (("task", 1.0), ("forget", -1.0)):
        diff = sign * (a[axis]["mean"] - b[axis]["mean"])
        m = _margin(a[axis], b[axis], z)
        out[axis] = 1 if diff > m else (-1 if diff < -m else 0)
    return out


def point_dominates(a: dict, b: dict, z: float = 0.0) -> bool:
    """a is no worse than b on both axes and better on one (each judged with a margin of ``z`` standard errors;
    ``z=0``: the plain definition on the means)."""
    c = compare_points(a, b, z)
    return min(c.values()) >= 0 and max(c.values()) > 0


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (on the means), sorted by forgetting."""
    usable = [p for p in points if p["task"]["mean"] is not None and p["forget"]["mean"] is not None]
    front = [p for p in usable if not any(point_dominates(q, p) for q in usable if q is not p)]
    return sorted(front, key=lambda p: (p["forget"]["mean"], -p["task"]["mean"]))


def front_dominates(front_a: list[dict], front_b: list[dict], z: float = 2.0) -> bool:
    """Every point of B's front is dominated by some point of A's front, beyond the noise margin (see the module
    docstring)."""
    if not front_a or not front_b:
        return False
    return all(any(point_dominates(a, b, z) for a in front_a) for b in front_b)


NO_VERDICT = "no verdict (fewer than 2 seeds: the noise margin is unknown)"


def _one_seed(front: list[dict]) -> bool:
    return any(min(p["task"]["n"], p["forget"]["n"]) < 2 for p in front)


def verdicts(fronts: dict[str, list[dict]], z: float = 2.0) -> dict:
    """For every ordered pair of methods: "dominates", "dominated" or "neither"; ``NO_VERDICT`` where a front holds
    a point measured on one seed (its standard error is unknown, so a zero margin would call noise a result)."""
    out = {}
    names = list(fronts)
    for a in names:
        for b in names:
            if a == b:
                continue
            if z > 0 and (_one_seed(fronts[a]) or _one_seed(fronts[b])):
                out[f"{a} vs {b}"] = NO_VERDICT
            elif front_dominates(fronts[a], fronts[b], z):
                out[f"{a} vs {b}"] = "dominates"
            elif front_dominates(fronts[b], fronts[a], z):
                out[f"{a} vs {b}"] = "dominated"
            else:
                out[f"{a} vs {b}"] = "neither"
    return out


def sweep(methods: Sequence[str], lrs: dict[str, Sequence[float]] | Sequence[float], seeds: Sequence[int],
          run_one: Callable[[str, float, int], dict], on_done: Callable[[dict, int, int], None] | None = None
          ) -> list[dict]:
    """Run ``run_one(method, lr, seed)`` for every method, learning rate (a list shared by all methods, or one
    per method) and seed; seed-major, so a stopped sweep has every method at the seeds it finished. Each
    returned dict gets ``method``, ``lr`` and ``seed``."""
    grid = [(seed, m, lr) for seed in seeds for m in methods
            for lr in (lrs[m] if isinstance(lrs, dict) else lrs)]
    runs = []
    for i, (seed, m, lr) in enumerate(grid, 1):
        r = dict(run_one(m, lr, seed))
        r.update(method=m, lr=lr, seed=seed)
        runs.append(r)
        if on_done is not None:
            on_done(r, i, len(grid))
    return runs


def protocol(runs: list[dict], task_key: str, forget_key: str, higher_is_better: bool, z: float = 2.0,
             extra: Sequence[str] = ()) -> dict:
    """Points per (method, lr), each method's Pareto front and the pairwise front verdicts."""
    points = aggregate(runs, task_key, forget_key, higher_is_better, extra)
    methods = list(dict.fromkeys(p["method"] for p in points))
    fronts = {m: pareto_front([p for p in points if p["method"] == m]) for m in methods}
    return {"task_key": task_key, "task_higher_is_better": higher_is_better, "forget_key": forget_key,
            "noise_z": z, "points": points,
            "fronts": {m: [{"lr": p["lr"], "task": p["task"]["mean"], "forget": p["forget"]["mean"]} for p in f]
                       for m, f in fronts.items()},
            "verdicts": verdicts(fronts, z)}
