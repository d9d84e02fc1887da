"""Retention: does LoPT forget less than end-to-end post-training, at the same learning?

A learning-forgetting Pareto protocol (as in Biderman et al. 2024, "LoRA Learns Less and Forgets Less"):
every method is post-trained on narrow task data at several learning rates and seeds, with the same budget
(the same batches in the same order, the same steps and tokens, AdamW, constant learning rate), and each run
is placed by its task performance against its forgetting, both measured on held-out data. A method is better
only where its Pareto front (the learning rates no other learning rate of the same method beats on both axes)
dominates another's beyond the seed noise; otherwise the verdict is "neither".

    python examples/retention.py                          # embedded default: no download (built once, cached)
    python examples/retention.py --preset protocol        # the measurement behind docs/retention.md
    python examples/retention.py --model ./my-model --task-data task.jsonl --general-data wiki.jsonl \\
        --steps 500 --lrs 1e-5,3e-5,1e-4,3e-4 --lora-lrs 1e-4,3e-4,1e-3,3e-3 --methods e2e,lopt-k2,lora --seeds 3

Embedded default: an 8-layer Llama (2 M parameters) pretrained here on the prose of the standard library's
pydoc_data topics (a byte-level BPE trained with `tokenizers`, digits split), the held-out topics as the
general (pretraining-distribution) text, and 2-digit addition ("47+58=" -> "105", 6000 distinct problems)
as the narrow task: digits and "+"/"=" are rare in the prose, so learning the format pulls the output
distribution away from it and end-to-end fine-tuning measurably forgets. Built once under --cache-dir;
the pretraining curve (held-out loss included) and its compute are stored with the model
(lopt_retention_spec.json) and copied into the JSON. Cost on one CPU thread: pretraining 6 minutes (once),
the default sweep (--preset quick: e2e and LoPT k=2 x 4 lrs x 2 seeds x 60 steps = 16 runs) about 4 minutes
(250 s measured), --preset protocol (5 methods x 4 lrs x 3 seeds x 150 steps = 60 runs) about 20 minutes. Larger: --d-model, --layers, --pretrain-steps, --steps,
--general-max-tokens, --device cuda (nothing is CPU-specific).

Data: jsonl/json (one JSON object a line) or parquet. Task rows are {"prompt", "completion"} (loss on the
completion and its EOS; exact match of the greedy completion) or {"text"} (loss on every token; no exact
match). The last --task-eval-size rows (after a fixed shuffle) are held out. General rows are {"text"};
a .txt file is read as plain text.

Methods (--methods): `e2e` trains every parameter. `lopt-k<K>` patches the model with
lopt_kernels.patch(num_blocks=K, lambda_aux=...), backpropagates `outputs.loss` (task + lambda_aux * aux)
and uses lopt_kernels.param_groups: the final block, final norm and head at the swept lr, the earlier blocks,
embeddings and aux decoders at lr * --local-lr-ratio. `lora` trains rank --lora-rank adapters on every linear
layer of a frozen base (PEFT); `lora+lopt-k<K>` is LoRA patched with LoPT. Full-model methods sweep --lrs,
LoRA methods --lora-lrs. All use torch.optim.AdamW(weight_decay=0) and no schedule.

Every metric, the front and the verdict are defined at the end of --help (the JSON's "definitions" repeats them).

Output: a table (one row per method and lr, mean ± std over seeds), the fronts and verdicts on stdout,
--json (every run with its loss curves, the points, fronts and verdicts, these definitions, the pretraining
record; rewritten after every run, so a stopped sweep leaves its partial state) and --plot (task against each
forgetting measure, error bars = seed std, fronts drawn). Bad input: one line on stderr and exit code 2,
as `lopt-kernels compare`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import retention_data  # noqa: E402
import retention_protocol  # noqa: E402

DEFINITIONS = {
    "task_loss": "mean cross-entropy per completion token (EOS included) on the held-out task rows",
    "exact_match": "share of held-out task rows whose greedy completion (up to EOS or newline, stripped) "
                   "equals the reference completion",
    "general_loss_rise": "forgetting: mean next-token cross-entropy (nats) on the held-out general text after "
                         "post-training minus before; > 0 = forgot",
    "flips_lost": "forgetting: held-out general-text token positions predicted right before (top-1: the argmax "
                  "of the logits is the actual next token) and wrong after (1 -> 0)",
    "flips_gained": "held-out general-text positions wrong before and right after (0 -> 1)",
    "flips_lost_share": "flips_lost / positions right before",
    "general_top1_after": "share of held-out general-text positions predicted right (top-1) after post-training",
    "general_ppl_after": "exp(mean cross-entropy per token) on the general text, EOS-joined, in windows of "
                         "--eval-seq",
    "retention_ratio": "general perplexity before / after (= exp(-general_loss_rise)); 1 = nothing lost",
    "train_seconds": "wall time of the training steps (forward, backward, optimizer), the memory-measured step "
                     "excluded",
    "peak_memory_mib": "CUDA: max_memory_allocated over training. CPU: live tensor bytes at the peak of a "
                       "training step (parameters, optimizer state, gradients, activations, temporaries), "
                       "counted by lopt_kernels.measure on step 2",
    "front": "a method's Pareto front: the learning rates that no other learning rate of the same method beats "
             "on both the task metric and the forgetting measure (seed means)",
    "verdict": "'A dominates B': every point of B's front is dominated by a point of A's front: no worse on "
               "either axis beyond the noise margin (noise_z standard errors of the difference of the seed means, "
               "per axis) and better on at least one beyond it; 'neither' when the fronts cross or agree within "
               "noise; 'no verdict' when a front point has fewer than 2 seeds (its noise margin is unknown)",
}

class RetentionError(Exception):
    """A bad input: reported in one line with exit code 2."""


# ------------------------------------------------------------------------------------------------ inputs


def _read_rows(path: str, flag: str) -> list:
    p = Path(path)
    if not p.is_file():
        raise RetentionError(f"{flag} {path!r}: no such file")
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
        if p.suffix == ".txt":
            return [{"text": t.strip()} for t in p.read_text().split("\n\n") if t.strip()]
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RetentionError(f"{flag} {path!r}: line {i} is not JSON ({exc.msg})") from None
        return rows
    except RetentionError:
        raise
    except Exception as exc:  # unreadable parquet, bad encoding, permissions
        raise RetentionError(f"{flag} {path!r} cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def read_nonempty(path: str, flag: str) -> list:
    rows = _read_rows(path, flag)
    if not rows:
        raise RetentionError(f"{flag} {path!r} is empty (no rows)")
    return rows


def load_task(path: str, rows: list, tokenizer, max_length: int) -> list[dict]:
    """Tokenised task rows: ``ids``, ``labels`` (-100 on the prompt), ``prompt_ids``, ``completion``."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not (("prompt" in r and "completion" in r) or "text" in r):
            raise RetentionError(f"--task-data {path!r}: row {i} has neither 'prompt' and 'completion' nor 'text'")
        if "prompt" in r:
            prompt = tokenizer(str(r["prompt"]), add_special_tokens=False)["input_ids"]
            completion = tokenizer(str(r["completion"]), add_special_tokens=False)["input_ids"] + eos
            ids = (prompt + completion)[:max_length]
            labels = ([-100] * len(prompt) + completion)[:max_length]
            out.append({"ids": ids, "labels": labels, "prompt_ids": prompt, "completion": str(r["completion"]).strip()})
        else:
            ids = (tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"] + eos)[:max_length]
            out.append({"ids": ids, "labels": list(ids), "prompt_ids": None, "completion": None})
    out = [r for r in out if sum(label != -100 for label in r["labels"][1:]) > 0]
    if not out:
        raise RetentionError(f"--task-data {path!r} is empty (no rows with tokens to learn)")
    return out


def load_general(path: str, rows: list, tokenizer, max_tokens: int) -> torch.Tensor:
    ids = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "text" not in r:
            raise RetentionError(f"--general-data {path!r}: row {i} has no 'text'")
        if str(r["text"]).strip():
            ids.extend(tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        if max_tokens and len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise RetentionError(f"--general-data {path!r} is empty (no text)")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def load_model(path: str, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    p = Path(path)
    if not p.is_dir():
        raise RetentionError(f"--model {path!r}: no such directory")
    if not (p / "config.json").is_file():
        raise RetentionError(f"--model {path!r} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetentionError(f"--model {path!r} is not a causal LM that transformers can load "
                             f"({type(config).__name__ if 'config' in locals() else 'config'}: {first})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise RetentionError(f"--model {path!r} is not a causal LM ({type(model).__name__} is encoder-decoder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as exc:
        raise RetentionError(f"--model {path!r}: no usable tokenizer ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------------------------------------ runs


def collate(picked: list[dict], pad_id: int, device) -> dict:
    seq = max(len(r["ids"]) for r in picked)
    ids = torch.full((len(picked), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(picked), seq), -100, dtype=torch.long)
    mask = torch.zeros((len(picked), seq), dtype=torch.long)
    for i, r in enumerate(picked):
        ids[i, : len(r["ids"])] = torch.tensor(r["ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        mask[i, : len(r["ids"])] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batches(rows: list[dict], batch_size: int, steps: int, seed: int, pad_id: int, device):
    """``steps`` right-padded batches drawn from a seed-fixed permutation of ``rows`` (epochs repeat it):
    the same for every method with the same seed."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(rows), generator=g).tolist()
        picked, order = [rows[i] for i in order[:batch_size]], order[batch_size:]
        yield collate(picked, pad_id, device)


@torch.no_grad()
def general_eval(model, ids: torch.Tensor, seq: int, batch: int, device) -> tuple[float, torch.Tensor]:
    """Mean next-token cross-entropy (nats) on ``ids`` in windows of ``seq`` (+1 for the target) and, per target
    position, whether the top-1 prediction (argmax of the logits) is the actual next token."""
    model.eval()
    usable = (len(ids) - 1) // seq * seq
    windows = ids[: usable + 1]
    nll, count, right = 0.0, 0, []
    starts = list(range(0, usable, seq)) or [0]
    for i in range(0, len(starts), batch):
        chunk = torch.stack([windows[s: s + seq + 1] if usable else ids for s in starts[i: i + batch]]).to(device)
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        target = chunk[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
        right.append((logits.argmax(-1) == target).flatten().cpu())
    return nll / count, torch.cat(right)


def general_ppl(model, ids: torch.Tensor, seq: int, batch: int, device) -> float:
    return math.exp(general_eval(model, ids, seq, batch, device)[0])


@torch.no_grad()
def task_metrics(model, rows: list[dict], tokenizer, batch: int, device) -> dict:
    """Held-out task loss per label token, and exact match of greedy completions (prompt/completion rows)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(rows), batch):
        b = collate(rows[i: i + batch], tokenizer.pad_token_id, device)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum").item()
        count += int((labels != -100).sum())
    gen = [r for r in rows if r["prompt_ids"] is not None]
    exact = None
    if gen:
        hits = 0
        by_len: dict[int, list[dict]] = {}
        for r in gen:
            by_len.setdefault(len(r["prompt_ids"]), []).append(r)
        for group in by_len.values():
            new = min(64, max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in group) + 1)
            for i in range(0, len(group), batch):
                part = group[i: i + batch]
                prompt = torch.tensor([r["prompt_ids"] for r in part], device=device)
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                for r, o in zip(part, out[:, prompt.shape[1]:].tolist()):
                    text = tokenizer.decode(o, skip_special_tokens=False)
                    if tokenizer.eos_token:
                        text = text.split(tokenizer.eos_token)[0]
                    hits += text.split("\n")[0].strip() == r["completion"]
        exact = hits / len(gen)
    return {"task_loss": nll / max(count, 1), "exact_match": exact}


def parse_method(name: str) -> tuple[bool, int | None]:
    """``e2e`` / ``lopt-k<K>`` / ``lora`` / ``lora+lopt-k<K>`` -> (LoRA?, K or None)."""
    if name in ("e2e", "lora"):
        return name == "lora", None
    lora = name.startswith("lora+")
    rest = name[len("lora+"):] if lora else name
    if rest.startswith("lopt-k") and rest[len("lopt-k"):].isdigit() and int(rest[len("lopt-k"):]) >= 2:
        return lora, int(rest[len("lopt-k"):])
    raise RetentionError(f"--methods: unknown method {name!r} (e2e, lopt-k<K>, lora, lora+lopt-k<K>; K >= 2)")


def prepare(base, method: str, lr: float, args, seed: int):
    """A fresh copy of the base model for one run (LoRA-wrapped, LoPT-patched) and its AdamW."""
    lora, k = parse_method(method)
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           lora_dropout=0.0, target_modules="all-linear"))
    if k is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    else:
        import lopt_kernels

        try:
            lopt_kernels.patch(model, num_blocks=k, lambda_aux=args.lambda_aux, mode=args.mode)
        except lopt_kernels.LoptPatchError as exc:
            raise RetentionError(f"--model {args.model!r} cannot be patched for LoPT (k={k}): {exc}") from None
        groups = lopt_kernels.param_groups(model, lr=lr, local_lr=lr * args.local_lr_ratio)
    return model, torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def _cpu_peak_bytes(step, model, optimizer) -> int:
    """Parameters, optimizer state and the step's own peak (gradients, activations, temporaries), counted by
    the dispatcher-level tracker of ``lopt-kernels compare``."""
    from lopt_kernels.measure import measure_step

    mem, _ = measure_step(step, model, torch.device("cpu"), memory=True, flops=False)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return mem.params + state + mem.step_peak


def train_run(base, method, lr, seed, data, args, device, progress) -> dict:
    model, optimizer = prepare(base, method, lr, args, seed)
    lopt = parse_method(method)[1] is not None
    model.train()
    losses, aux, step_times, peak, tokens = [], [], [], None, 0
    measured = min(1, args.steps - 1) if device.type == "cpu" else None  # step 2: optimizer state exists
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, batch in enumerate(batches(data["train"], args.batch_size, args.steps, seed, data["pad_id"], device)):
        record = {}
        tokens += int(batch["attention_mask"].sum())

        def fwd_bwd():
            out = model(**batch)
            out.loss.backward()  # LoPT: task + lambda_aux * aux (README)
            record["task"] = (out.task_loss if lopt else out.loss).item()
            record["aux"] = out.lopt_aux_loss.item() if lopt else None

        started = time.perf_counter()
        if step == measured:
            peak = _cpu_peak_bytes(fwd_bwd, model, optimizer)
        else:
            fwd_bwd()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step != measured:
            step_times.append(time.perf_counter() - started)
        losses.append(record["task"])
        aux.append(record["aux"])
        progress.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    model.eval()
    metrics = task_metrics(model, data["eval"], data["tokenizer"], args.eval_batch, device)
    loss, right = general_eval(model, data["general"], args.eval_seq, args.eval_batch, device)
    flips = retention_protocol.count_flips(data["right_before"].tolist(), right.tolist())
    run = {"method": method, "lr": lr, "local_lr": lr * args.local_lr_ratio if lopt else None, "seed": seed,
           **metrics, "general_loss_after": loss, "general_loss_rise": loss - data["loss_before"],
           "general_ppl_after": math.exp(loss), "retention_ratio": math.exp(data["loss_before"] - loss),
           "general_top1_after": flips["right_after"] / flips["n"], "flips_lost": flips["lost"],
           "flips_gained": flips["gained"], "flips_lost_share": flips["lost_share"],
           "train_seconds": sum(step_times), "train_tokens": tokens,
           "peak_memory_mib": None if peak is None else peak / 2**20, "task_loss_curve": losses}
    if lopt:
        run["aux_loss_curve"] = aux
    del model, optimizer
    return run


class Progress:
    """A tqdm bar over all training steps on a terminal; one line per finished run otherwise."""

    def __init__(self, total_steps: int, runs: int):
        self.bar, self.runs, self.done_runs = None, runs, 0
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="retention", unit="step", file=sys.stderr)

    def start(self, name: str) -> None:
        self.started = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finished(self, name: str, run: dict) -> None:
        self.done_runs += 1
        if self.bar is None:
            em = "" if run["exact_match"] is None else f", exact match {run['exact_match']:.3f}"
            print(f"retention [{self.done_runs}/{self.runs}] {name} done in {time.perf_counter() - self.started:.1f} s: "
                  f"task loss {run['task_loss']:.3f}{em}, general ppl {run['general_ppl_after']:.2f}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ report

METRICS = (("task_loss", "task loss", "{:.3f}"), ("exact_match", "exact match", "{:.3f}"),
           ("general_loss_rise", "gen. loss rise", "{:.3f}"), ("flips_lost", "flips 1->0", "{:.0f}"),
           ("flips_gained", "flips 0->1", "{:.0f}"), ("retention_ratio", "retention", "{:.3f}"),
           ("train_seconds", "train s", "{:.1f}"), ("peak_memory_mib", "peak MiB", "{:.2f}"))
FORGETTING = (("general_loss_rise", "general loss rise (nats, held-out)"),
              ("flips_lost", "held-out general positions flipped right -> wrong"))


def summarise(runs: list[dict], task_metric: str, z: float) -> dict:
    """Per forgetting measure: the protocol (points per method and lr, fronts, verdicts) on --task-metric."""
    higher = task_metric == "exact_match"
    extra = [k for k, _, _ in METRICS]
    return {forget: retention_protocol.protocol(runs, task_metric, forget, higher, z, extra)
            for forget, _ in FORGETTING}


def format_table(points: list[dict], before: dict) -> str:
    cols = [(key, title, fmt) for key, title, fmt in METRICS if any(p[key]["n"] for p in points)]
    head = ["method", "lr", "seeds"] + [t for _, t, _ in cols]
    rows = [["before", "", ""] + [(fmt.format(before[k]) if before.get(k) is not None else "") for k, _, fmt in cols]]
    for p in points:
        rows.append([p["method"], f"{p['lr']:g}", str(len(p["seeds"]))]
                    + [f"{fmt.format(p[k]['mean'])} ± {fmt.format(p[k]['std'])}" if p[k]["n"] else "-"
                       for k, _, fmt in cols])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def format_fronts(protocols: dict, task_metric: str) -> str:
    out = []
    for forget, proto in protocols.items():
        out.append(f"Pareto fronts, {task_metric} vs {forget} (lr: task, forgetting; seed means):")
        for m, front in proto["fronts"].items():
            sign = 1 if proto["task_higher_is_better"] else -1
            out.append(f"  {m}: " + "; ".join(f"{p['lr']:g}: {sign * p['task']:.3f}, {p['forget']:.3g}" for p in front))
        out.append(f"verdicts (noise margin {proto['noise_z']:g} standard errors):")
        for pair, v in proto["verdicts"].items():
            a, b = pair.split(" vs ")
            if v != "dominated" and (v == "dominates" or a < b):  # each pair once
                out.append(f"  {pair}: {v}")
    return "\n".join(out)


def write_plot(path: str, protocols: dict, methods: list[str], task_metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(protocols), figsize=(6.2 * len(protocols), 5))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (forget, proto) in zip(axes, protocols.items()):
        sign = 1 if proto["task_higher_is_better"] else -1
        for m in methods:
            pts = [p for p in proto["points"] if p["method"] == m]
            if not pts:
                continue
            ax.errorbar([p["forget"]["mean"] for p in pts], [sign * p["task"]["mean"] for p in pts],
                        xerr=[p["forget"]["std"] for p in pts], yerr=[p["task"]["std"] for p in pts], fmt="o",
                        color=colors[m], alpha=0.45, ms=4, capsize=2)
            for p in pts:
                ax.annotate(f"{p['lr']:g}", (p["forget"]["mean"], sign * p["task"]["mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=colors[m])
            front = proto["fronts"][m]
            ax.plot([p["forget"] for p in front], [sign * p["task"] for p in front], "-o", color=colors[m], label=m,
                    lw=1.6, ms=5)
        ax.set_xlabel(dict(FORGETTING)[forget] + " (lower: forgets less)")
        ax.set_ylabel({"exact_match": "exact match, held-out task (higher: learns more)",
                       "task_loss": "task loss, held-out (lower: learns more)"}[task_metric])
        if not proto["task_higher_is_better"]:
            ax.invert_yaxis()  # up = learns more, on both metrics
        ax.set_title(f"fronts: {forget}; error bars = seed std, labels = lr", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

DEFAULT_METHODS = "e2e,lopt-k2,lopt-k4,lora,lora+lopt-k2"
# What a run sweeps unless the flags say otherwise: "quick" (the default) is a look a user reruns in minutes on a CPU
# (two methods, two seeds, a short budget: a noise margin exists, verdicts are weak); "protocol" is the measurement
# behind docs/retention.md (5 methods x 4 lrs x 3 seeds x 150 steps, ~20 minutes on one CPU thread).
PRESETS = {
    "quick": dict(methods="e2e,lopt-k2", lrs="1e-4,3e-4,1e-3,3e-3", lora_lrs="3e-4,1e-3,3e-3,1e-2", steps=60, seeds=2),
    "protocol": dict(methods=DEFAULT_METHODS, lrs="1e-4,3e-4,1e-3,3e-3", lora_lrs="3e-4,1e-3,3e-3,1e-2", steps=150,
                     seeds=3),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retention.py", description=__doc__, epilog=_definitions_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face causal LM directory with its tokenizer "
                   "(default: the embedded small Llama, built once)")
    p.add_argument("--task-data", help="narrow post-training data, .jsonl/.json/.parquet (default: 2-digit addition)")
    p.add_argument("--general-data", help="held-out general text, .jsonl/.json/.parquet/.txt "
                   "(default: held-out pydoc_data topics)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick", help="what --methods, --lrs, --lora-lrs, "
                   "--steps and --seeds default to: " + "; ".join(
                       f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for name, values in PRESETS.items())
                   + " (default quick: minutes on a CPU once the model is built; protocol: the documented run)")
    p.add_argument("--methods", default=None, help="comma-separated: e2e, lopt-k<K>, lora, lora+lopt-k<K> "
                   "(default: the preset's)")
    p.add_argument("--lrs", default=None, help="learning rates swept by the full-model methods "
                   "(AdamW lr: every parameter for e2e; the final block, final norm and head for LoPT; "
                   "default: the preset's, 1e-4,3e-4,1e-3,3e-3)")
    p.add_argument("--lora-lrs", default=None, help="learning rates swept by the LoRA methods "
                   "(default: the preset's, 3e-4,1e-3,3e-3,1e-2)")
    p.add_argument("--local-lr-ratio", type=float, default=1.0, help="LoPT: lr of the earlier blocks, embeddings and "
                   "aux decoders = this x lr (default 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=32, help="task rows per step (default 32)")
    p.add_argument("--lambda-aux", type=float, default=10.0)
    p.add_argument("--mode", default="auto", help="lopt_kernels.patch mode (default auto)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1; a seed fixes the data order "
                   "(same for every method and lr) and the aux-decoder and LoRA init (default: the preset's)")
    p.add_argument("--lora-rank", type=int, default=8, metavar="R", help="LoRA rank on every linear layer, frozen "
                   "base, alpha 2R (default 8)")
    p.add_argument("--task-metric", choices=("task_loss", "exact_match"), default="task_loss",
                   help="task axis of the fronts and verdicts (default task_loss: continuous, and informative where "
                   "exact match is still near 0, as at the miniature's budget; exact_match needs prompt/completion "
                   "rows). The JSON has the fronts on both when both exist")
    p.add_argument("--noise-z", type=float, default=2.0, help="noise margin of the front verdicts, in standard "
                   "errors of the difference of seed means (default 2; 0: plain dominance on the means)")
    p.add_argument("--task-eval-size", type=int, default=256, help="held-out task rows (default 256, at most half)")
    p.add_argument("--max-length", type=int, default=256, help="task rows are cut to this many tokens")
    p.add_argument("--eval-seq", type=int, default=128, help="general-text window (default 128)")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--general-max-tokens", type=int, default=16_384, help="general text used, in tokens (0: all; "
                   "default 16384)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", dest="json_path", default="retention.json", help="JSON output (default retention.json)")
    p.add_argument("--plot", dest="plot_path", default="retention.png", help="PNG output ('' for none)")
    p.add_argument("--from-json", default=None, metavar="PATH", help="train nothing: re-summarise the runs of an "
                   "earlier --json (a finished or a stopped sweep) with this --task-metric and --noise-z, print the "
                   "table, fronts and verdicts, and write --json and --plot")
    d = p.add_argument_group("embedded default (used without --model/--task-data/--general-data)")
    d.add_argument("--cache-dir", default=None, help="where it is built once (default: "
                   "$XDG_CACHE_HOME/lopt_kernels/retention or ~/.cache/lopt_kernels/retention)")
    spec = retention_data.PretrainSpec()
    d.add_argument("--pretrain-steps", type=int, default=spec.steps, help=f"default {spec.steps}")
    d.add_argument("--d-model", type=int, default=spec.d_model, help=f"default {spec.d_model}")
    d.add_argument("--layers", type=int, default=spec.layers, help=f"default {spec.layers}")
    d.add_argument("--vocab", type=int, default=spec.vocab, help=f"default {spec.vocab}")
    d.add_argument("--task-digits", type=int, default=2, help="operand digits of the default addition task (default 2)")
    d.add_argument("--task-rows", type=int, default=6000, help="distinct problems in the default task (default 6000)")
    d.add_argument("--smoke", action="store_true", help="tiny everything (model, data, steps) for CI: seconds")
    return p


def _definitions_text() -> str:
    import textwrap

    out = ["definitions (per run, then the protocol over runs; the JSON's \"definitions\" repeats them):"]
    for key, text in DEFINITIONS.items():
        out.append(textwrap.fill(text, 116, initial_indent=f"  {key:<19}", subsequent_indent=" " * 21))
    return "\n".join(out)


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RetentionError(f"{flag} {text!r}: comma-separated numbers, e.g. 1e-4,3e-4") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise RetentionError(f"{flag} {text!r}: each must be a positive number")
    return vals


def _check(args) -> list[str]:
    for name, value in PRESETS[args.preset].items():  # what the flags leave unset
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag in ("steps", "batch_size", "seeds", "task_eval_size", "max_length", "eval_seq", "eval_batch",
                 "pretrain_steps", "d_model", "layers", "vocab", "task_digits", "task_rows", "lora_rank"):
        if getattr(args, flag) < 1:
            raise RetentionError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.general_max_tokens < 0:
        raise RetentionError(f"--general-max-tokens must be >= 0, got {args.general_max_tokens}")
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if not methods:
        raise RetentionError("--methods is empty")
    for m in methods:
        parse_method(m)
    args.lr_list, args.lora_lr_list = _floats(args.lrs, "--lrs"), _floats(args.lora_lrs, "--lora-lrs")
    if args.device not in (None, "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise RetentionError(f"--device {args.device!r} is not available here")
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RetentionError("--plot needs matplotlib: pip install matplotlib (or --plot '')") from None
    return methods


def resummarise(args) -> dict:
    try:
        result = json.loads(Path(args.from_json).read_text())
        runs, before = result["runs"], result["before"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RetentionError(f"--from-json {args.from_json!r}: not a retention.py JSON ({type(exc).__name__})") from None
    if not runs:
        raise RetentionError(f"--from-json {args.from_json!r} has no finished runs")
    methods = [m for m in result.get("methods", []) if any(r["method"] == m for r in runs)]
    protocols = summarise(runs, args.task_metric, args.noise_z)
    by_metric = {m: (protocols if m == args.task_metric else summarise(runs, m, args.noise_z))
                 for m in ("task_loss", "exact_match") if all(r.get(m) is not None for r in runs)}
    print(f"retention (from {args.from_json}, {len(runs)} runs{'' if result.get('complete') else ', partial'}): "
          f"{result.get('title', '')}")
    print(format_table(protocols["general_loss_rise"]["points"], before))
    print(format_fronts(protocols, args.task_metric))
    result.update(task_metric=args.task_metric, protocols=protocols, protocols_by_task_metric=by_metric,
                  definitions=DEFINITIONS)
    if args.json_path:
        _write_json(args.json_path, result)
        print(f"json: {args.json_path}")
    if args.plot_path:
        write_plot(args.plot_path, protocols, methods, args.task_metric, f"retention: {result.get('title', '')}"
                   + ("" if result.get("complete") else f" (partial: {len(runs)} runs)"))
        print(f"plot: {args.plot_path}")
    return result


def run(args) -> dict:
    started = time.perf_counter()
    methods = _check(args)
    if args.from_json:
        return resummarise(args)
    if args.smoke:
        spec = retention_data.SMOKE
        args.d_model, args.layers, args.vocab, args.pretrain_steps = spec.d_model, spec.layers, spec.vocab, spec.steps
    else:
        spec = retention_data.PretrainSpec(d_model=args.d_model, layers=args.layers, vocab=args.vocab,
                                           steps=args.pretrain_steps, ffn=_ffn(args.d_model))
    built, model_name = 0.0, None
    if args.model is None or args.task_data is None or args.general_data is None:
        cache = Path(args.cache_dir) if args.cache_dir else retention_data.default_cache_dir()
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        paths = retention_data.build_default(cache, spec, model=args.model is None, task_rows=args.task_rows,
                                             digits=args.task_digits, log=log)
        built = paths["built_seconds"]
        if args.model is None:
            model_name = f"embedded {paths['model'].name}"
        args.model = args.model or str(paths["model"])
        args.task_data = args.task_data or str(paths["task_data"])
        args.general_data = args.general_data or str(paths["general_data"])
    task_rows = read_nonempty(args.task_data, "--task-data")
    general_rows = read_nonempty(args.general_data, "--general-data")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, tokenizer = load_model(args.model, device)
    rows = load_task(args.task_data, task_rows, tokenizer, args.max_length)
    if len(rows) < 2:
        raise RetentionError(f"--task-data {args.task_data!r} has {len(rows)} row: at least 2 are needed "
                             "(held-out and training)")
    general = load_general(args.general_data, general_rows, tokenizer, args.general_max_tokens)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1234)).tolist()
    n_eval = min(args.task_eval_size, len(rows) // 2)
    data = {"eval": [rows[i] for i in order[:n_eval]], "train": [rows[i] for i in order[n_eval:]],
            "general": general, "tokenizer": tokenizer, "pad_id": tokenizer.pad_token_id}
    lrs = {m: (args.lora_lr_list if parse_method(m)[0] else args.lr_list) for m in methods}
    for m in methods:  # refuse a model LoPT cannot patch before training anything
        if parse_method(m)[1] is not None:
            prepare(base, m, lrs[m][0], args, 0)
    task_metric = args.task_metric
    if task_metric == "exact_match" and not any(r["prompt_ids"] is not None for r in data["eval"]):
        raise RetentionError("--task-metric exact_match needs prompt/completion task rows")

    before = task_metrics(base, data["eval"], tokenizer, args.eval_batch, device)
    data["loss_before"], data["right_before"] = general_eval(base, general, args.eval_seq, args.eval_batch, device)
    before.update(general_loss=data["loss_before"], general_ppl_after=math.exp(data["loss_before"]),
                  general_top1=float(data["right_before"].float().mean()), general_positions=len(data["right_before"]),
                  general_right=int(data["right_before"].sum()), retention_ratio=1.0, general_loss_rise=0.0)
    n_params = sum(p.numel() for p in base.parameters())
    n_layers = getattr(base.config, "num_hidden_layers", None)
    title = (f"{model_name or Path(args.model).name} ({n_params / 1e6:.1f} M params, {n_layers} layers), "
             f"{args.steps} steps x {args.batch_size} rows, {args.seeds} seeds, {device.type}")
    print(f"retention: {title}", flush=True)
    print(f"before post-training: task loss {before['task_loss']:.3f}"
          + ("" if before["exact_match"] is None else f", exact match {before['exact_match']:.3f}")
          + f", general loss {data['loss_before']:.3f} (ppl {before['general_ppl_after']:.2f}, top-1 "
          f"{before['general_top1']:.3f} of {before['general_positions']} positions); {len(data['train'])} training "
          f"/ {n_eval} held-out task rows", flush=True)
    pretraining = None
    spec_file = Path(args.model) / "lopt_retention_spec.json"
    if spec_file.is_file():
        pretraining = json.loads(spec_file.read_text())
    n_runs = sum(len(lrs[m]) for m in methods) * args.seeds
    progress = Progress(n_runs * args.steps, n_runs)
    result = {
        "command": "python examples/retention.py " + " ".join(sys.argv[1:]),
        "title": title, "definitions": DEFINITIONS, "task_metric": task_metric, "methods": methods, "lrs": lrs,
        "settings": {k: v for k, v in vars(args).items()}, "device": device.type, "model_parameters": n_params,
        "model_layers": n_layers, "pretraining": pretraining,
        "train_rows": len(data["train"]), "eval_rows": n_eval, "general_tokens": len(general),
        "torch_threads": torch.get_num_threads(), "before": before, "complete": False,
    }

    def run_one(method, lr, seed):
        progress.start(f"{method} lr {lr:g} seed {seed}")
        return train_run(base, method, lr, seed, data, args, device, progress)

    def on_done(r, i, total):
        progress.finished(f"{r['method']} lr {r['lr']:g} seed {r['seed']}", r)
        runs.append(r)
        if args.json_path:  # partial state after every run
            _write_json(args.json_path, {**result, "runs": runs, "wall_seconds": round(time.perf_counter() - started, 1)})

    runs: list[dict] = []
    try:
        retention_protocol.sweep(methods, lrs, range(args.seeds), run_one, on_done)
    finally:
        progress.close()
    protocols = summarise(runs, task_metric, args.noise_z)
    by_metric = {m: (protocols if m == task_metric else summarise(runs, m, args.noise_z))
                 for m in ("task_loss", "exact_match") if all(r.get(m) is not None for r in runs)}
    print(format_table(protocols["general_loss_rise"]["points"], before))
    print(format_fronts(protocols, task_metric))
    wall = time.perf_counter() - started
    result.update(protocols=protocols, protocols_by_task_metric=by_metric, runs=runs, complete=True,
                  build_seconds=round(built, 1), wall_seconds=round(wall, 1))
    if args.json_path:
        _write_json(args.json_path, result)
        print(f"json: {args.json_path}")
    if args.plot_path:
        write_plot(args.plot_path, protocols, methods, task_metric, f"retention: {title}")
        print(f"plot: {args.plot_path}")
    print(f"wall time {wall:.0f} s" + (f" (of which building the embedded default {built:.0f} s)" if built else ""))
    return result


def _write_json(path: str, obj: dict) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _ffn(d: int) -> int:
    return 64 * math.ceil(8 * d / 3 / 64)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RetentionError as exc:
        print(f"retention: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
