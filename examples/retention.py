"""Retention: what does LoPT keep that end-to-end post-training loses?

Post-trains one causal LM on narrow task data with the same budget (same batches in the same order, same
steps and tokens, same AdamW and constant learning rate) end-to-end and with LoPT, over several seeds, and
measures the task (held-out loss, exact-match accuracy) and the general text the model knew before
(perplexity on held-out general text, before and after).

    python examples/retention.py                          # embedded default: no download (built once, cached)
    python examples/retention.py --model ./my-model --task-data task.jsonl --general-data wiki.jsonl \\
        --steps 500 --lr 1e-5 --local-lr 1e-5 --num-blocks 2,4 --seeds 3 --lora 16

Embedded default: a small Llama pretrained here on the prose of the standard library's pydoc_data topics
(a byte-level BPE trained with `tokenizers`, digits split), the held-out topics as general text, and
2-digit addition ("47+58=" -> "105", 6000 distinct problems) as the task; built once under --cache-dir.

Data: jsonl/json (one JSON object a line) or parquet. Task rows are {"prompt", "completion"} (loss on the
completion and its EOS; exact match of the greedy completion) or {"text"} (loss on every token; no exact
match). The last --task-eval-size rows (after a fixed shuffle) are held out. General rows are {"text"};
a .txt file is read as plain text.

Methods: `e2e` trains every parameter with --lr. `lopt-k<K>` patches the model with
lopt_kernels.patch(num_blocks=K, lambda_aux=...), backpropagates `outputs.loss` (task + lambda_aux * aux)
and uses lopt_kernels.param_groups: the final block, final norm and head at --lr, the earlier blocks,
embeddings and aux decoders at --local-lr. Both use torch.optim.AdamW(weight_decay=0) and no schedule.
With --lora R both train rank-R LoRA adapters on every linear layer of a frozen base (PEFT).

Retention ratio = general perplexity before / general perplexity after post-training (= exp(-increase of
the general loss in nats)): 1.0 keeps everything, lower loses more (above 1: general text improved).
`forgetting_avoided` = 1 - (LoPT's increase of the general loss) / (e2e's, same seed): the share of
end-to-end's forgetting that LoPT avoids (1: all of it, 0: none, negative: LoPT forgets more).

Output: a table (mean +- std over seeds) on stdout, --json (every run: metrics and loss curves; the
summary; these definitions) and --plot (task metric against general perplexity, one point per run; the
task-loss curves). Bad input: one line on stderr and exit code 2, as `lopt-kernels compare`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import retention_data  # noqa: E402

DEFINITIONS = {
    "retention_ratio": "general perplexity before / general perplexity after post-training "
                       "(exp of minus the increase of the general loss); 1 = nothing lost, lower = more lost",
    "forgetting_avoided": "1 - (this method's increase of the general loss) / (e2e's increase, same seed): the "
                          "share of end-to-end's forgetting avoided; 1 = all, 0 = none, < 0 = forgets more",
    "task_loss": "mean cross-entropy per completion token (EOS included) on the held-out task rows",
    "exact_match": "share of held-out task rows whose greedy completion (up to EOS or newline, stripped) "
                   "equals the reference completion",
    "general_ppl": "exp(mean cross-entropy per token) on the general text, EOS-joined, in windows of --eval-seq",
    "train_seconds": "wall time of the training steps (forward, backward, optimizer), the memory-measured step "
                     "excluded",
    "peak_memory_mib": "CUDA: max_memory_allocated over training. CPU: live tensor bytes at the peak of a "
                       "training step (parameters, optimizer state, gradients, activations, temporaries), "
                       "counted by lopt_kernels.measure on step 2",
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
def general_ppl(model, ids: torch.Tensor, seq: int, batch: int, device) -> float:
    model.eval()
    usable = (len(ids) - 1) // seq * seq
    windows = ids[: usable + 1]
    nll, count = 0.0, 0
    starts = list(range(0, usable, seq)) or [0]
    for i in range(0, len(starts), batch):
        chunk = torch.stack([windows[s: s + seq + 1] if usable else ids for s in starts[i: i + batch]]).to(device)
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


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


def prepare(base, method: str, k: int | None, args, seed: int):
    """A fresh copy of the base model for one run (LoRA-wrapped, LoPT-patched) and its AdamW."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    if method == "e2e":
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": args.lr}]
    else:
        import lopt_kernels

        try:
            lopt_kernels.patch(model, num_blocks=k, lambda_aux=args.lambda_aux, mode=args.mode)
        except lopt_kernels.LoptPatchError as exc:
            raise RetentionError(f"--model {args.model!r} cannot be patched for LoPT (k={k}): {exc}") from None
        groups = lopt_kernels.param_groups(model, lr=args.lr, local_lr=args.local_lr)
    return model, torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)


def _cpu_peak_bytes(step, model, optimizer) -> int:
    """Parameters, optimizer state and the step's own peak (gradients, activations, temporaries), counted by
    the dispatcher-level tracker of ``lopt-kernels compare``."""
    from lopt_kernels.measure import measure_step

    mem, _ = measure_step(step, model, torch.device("cpu"), memory=True, flops=False)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return mem.params + state + mem.step_peak


def train_run(base, method, k, seed, data, args, device, progress) -> dict:
    model, optimizer = prepare(base, method, k, args, seed)
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
            record["task"] = (out.task_loss if method != "e2e" else out.loss).item()
            record["aux"] = out.lopt_aux_loss.item() if method != "e2e" else None

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
    ppl = general_ppl(model, data["general"], args.eval_seq, args.eval_batch, device)
    run = {"method": method, "num_blocks": k, "seed": seed, **metrics, "general_ppl_after": ppl,
           "retention_ratio": data["ppl_before"] / ppl, "train_seconds": sum(step_times),
           "train_tokens": tokens,
           "peak_memory_mib": None if peak is None else peak / 2**20, "task_loss_curve": losses}
    if method != "e2e":
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
           ("general_ppl_after", "general ppl after", "{:.2f}"), ("retention_ratio", "retention", "{:.3f}"),
           ("forgetting_avoided", "forgetting avoided", "{:.2f}"), ("train_seconds", "train s", "{:.1f}"),
           ("peak_memory_mib", "peak MiB", "{:.2f}"))


def summarise(runs: list[dict], methods: list[str]) -> dict:
    e2e = {r["seed"]: r for r in runs if r["method"] == "e2e"}
    for r in runs:
        base = e2e.get(r["seed"])
        if base is not None and r["method"] != "e2e":
            lost = math.log(base["general_ppl_after"] / base["general_ppl_before"])
            mine = math.log(r["general_ppl_after"] / r["general_ppl_before"])
            r["forgetting_avoided"] = 1 - mine / lost if abs(lost) > 1e-9 else None
    summary = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        summary[m] = {}
        for key, _, _ in METRICS:
            vals = [r[key] for r in mine if r.get(key) is not None]
            if vals:
                summary[m][key] = {"mean": statistics.fmean(vals),
                                   "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return summary


def format_table(summary: dict, before: dict) -> str:
    cols = [(key, title, fmt) for key, title, fmt in METRICS if any(key in s for s in summary.values())]
    head = ["method"] + [t for _, t, _ in cols]
    rows = [["before"] + [(fmt.format(before[k]) if before.get(k) is not None else "") for k, _, fmt in cols]]
    for m, s in summary.items():
        rows.append([m] + [f"{fmt.format(s[k]['mean'])} ± {fmt.format(s[k]['std'])}" if k in s else "-"
                           for k, _, fmt in cols])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def write_plot(path: str, runs: list[dict], methods: list[str], before: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    use_em = all(r["exact_match"] is not None for r in runs)
    key, label = ("exact_match", "exact-match accuracy (held-out task)") if use_em else ("task_loss", "task loss (held-out)")
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        left.scatter([r["general_ppl_after"] for r in mine], [r[key] for r in mine], color=colors[m], label=m, s=40)
        for r in mine:
            left.annotate(f"s{r['seed']}", (r["general_ppl_after"], r[key]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
            curve = r["task_loss_curve"]
            w = max(1, len(curve) // 30)
            smooth = [statistics.fmean(curve[max(0, i - w + 1): i + 1]) for i in range(len(curve))]
            right.plot(range(1, len(curve) + 1), smooth, color=colors[m], alpha=0.8,
                       label=m if r is mine[0] else None)
    left.axvline(before["general_ppl_after"], color="gray", ls="--", lw=1, label="general ppl before")
    left.set_xlabel("general perplexity after post-training (held-out)")
    left.set_ylabel(label)
    left.set_title("task vs general text, one point per run")
    left.legend(fontsize=8)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("training task loss (moving mean)")
    right.set_title("task-loss curves")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retention.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face causal LM directory with its tokenizer "
                   "(default: the embedded small Llama, built once)")
    p.add_argument("--task-data", help="narrow post-training data, .jsonl/.json/.parquet (default: 2-digit addition)")
    p.add_argument("--general-data", help="held-out general text, .jsonl/.json/.parquet/.txt "
                   "(default: held-out pydoc_data topics)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    p.add_argument("--batch-size", type=int, default=32, help="task rows per step (default 32)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW lr: every parameter for e2e; the final block, "
                   "final norm and head for LoPT (default 3e-4)")
    p.add_argument("--local-lr", type=float, default=None, help="LoPT: lr of the earlier blocks, embeddings and aux "
                   "decoders (default: --lr)")
    p.add_argument("--num-blocks", default="2", help="LoPT block counts to run, comma-separated, e.g. 2,4 (default 2)")
    p.add_argument("--lambda-aux", type=float, default=10.0)
    p.add_argument("--mode", default="auto", help="lopt_kernels.patch mode (default auto)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1; a seed fixes the data order "
                   "(same for every method) and the aux-decoder and LoRA init (default 3)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank on every linear layer, frozen base "
                   "(default 0: full fine-tune)")
    p.add_argument("--task-eval-size", type=int, default=256, help="held-out task rows (default 256, at most half)")
    p.add_argument("--max-length", type=int, default=256, help="task rows are cut to this many tokens")
    p.add_argument("--eval-seq", type=int, default=128, help="general-text window (default 128)")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--general-max-tokens", type=int, default=50_000, help="general text used, in tokens (0: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", dest="json_path", default="retention.json", help="JSON output (default retention.json)")
    p.add_argument("--plot", dest="plot_path", default="retention.png", help="PNG output ('' for none)")
    d = p.add_argument_group("embedded default (used without --model/--task-data/--general-data)")
    d.add_argument("--cache-dir", default=None, help="where it is built once (default: "
                   "$XDG_CACHE_HOME/lopt_kernels/retention or ~/.cache/lopt_kernels/retention)")
    spec = retention_data.PretrainSpec()
    d.add_argument("--pretrain-steps", type=int, default=spec.steps)
    d.add_argument("--d-model", type=int, default=spec.d_model)
    d.add_argument("--layers", type=int, default=spec.layers)
    d.add_argument("--vocab", type=int, default=spec.vocab)
    d.add_argument("--task-digits", type=int, default=2, help="operand digits of the default addition task (default 2)")
    d.add_argument("--task-rows", type=int, default=6000, help="distinct problems in the default task (default 6000)")
    d.add_argument("--smoke", action="store_true", help="tiny everything (model, data, steps) for CI: seconds")
    return p


def _check(args) -> list[int]:
    for flag in ("steps", "batch_size", "seeds", "task_eval_size", "max_length", "eval_seq", "eval_batch",
                 "pretrain_steps", "d_model", "layers", "vocab", "task_digits", "task_rows"):
        if getattr(args, flag) < 1:
            raise RetentionError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lora < 0:
        raise RetentionError(f"--lora must be >= 0, got {args.lora}")
    if args.general_max_tokens < 0:
        raise RetentionError(f"--general-max-tokens must be >= 0, got {args.general_max_tokens}")
    try:
        ks = [int(k) for k in args.num_blocks.split(",") if k.strip()]
    except ValueError:
        raise RetentionError(f"--num-blocks {args.num_blocks!r}: comma-separated integers, e.g. 2,4") from None
    if not ks or any(k < 2 for k in ks):
        raise RetentionError(f"--num-blocks {args.num_blocks!r}: each must be >= 2")
    if args.device not in (None, "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise RetentionError(f"--device {args.device!r} is not available here")
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RetentionError("--plot needs matplotlib: pip install matplotlib (or --plot '')") from None
    return ks


def run(args) -> dict:
    started = time.perf_counter()
    ks = _check(args)
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
    methods = [("e2e", None)] + [(f"lopt-k{k}", k) for k in ks]
    for name, k in methods[1:]:  # refuse a model LoPT cannot patch before training anything
        prepare(base, name, k, args, 0)

    before = task_metrics(base, data["eval"], tokenizer, args.eval_batch, device)
    before["general_ppl_after"] = data["ppl_before"] = general_ppl(base, general, args.eval_seq, args.eval_batch, device)
    before["retention_ratio"] = 1.0
    n_params = sum(p.numel() for p in base.parameters())
    title = (f"{model_name or Path(args.model).name} ({n_params / 1e6:.1f} M params), {args.steps} steps x {args.batch_size} rows, "
             f"lr {args.lr:g}, local lr {args.local_lr if args.local_lr is not None else args.lr:g}"
             f"{f', LoRA r={args.lora}' if args.lora else ', full fine-tune'}, {args.seeds} seeds, {device.type}")
    print(f"retention: {title}", flush=True)
    print(f"before post-training: task loss {before['task_loss']:.3f}"
          + ("" if before["exact_match"] is None else f", exact match {before['exact_match']:.3f}")
          + f", general ppl {data['ppl_before']:.2f} ({len(data['train'])} training / {n_eval} held-out task rows, "
          f"{len(general)} general tokens)", flush=True)
    runs = []
    progress = Progress(len(methods) * args.seeds * args.steps, len(methods) * args.seeds)
    try:
        for seed in range(args.seeds):
            for name, k in methods:
                progress.start(f"{name} seed {seed}")
                run = train_run(base, name, k, seed, data, args, device, progress)
                run["general_ppl_before"] = data["ppl_before"]
                runs.append(run)
                progress.finished(f"{name} seed {seed}", run)
    finally:
        progress.close()
    names = [m for m, _ in methods]
    summary = summarise(runs, names)
    table = format_table(summary, before)
    print(table)
    wall = time.perf_counter() - started
    tokens = sum(int(sum(t != -100 for t in r["labels"][1:])) for r in data["train"])
    result = {
        "command": "python examples/retention.py " + " ".join(sys.argv[1:]),
        "title": title, "definitions": DEFINITIONS,
        "settings": {k: v for k, v in vars(args).items()}, "device": device.type, "model_parameters": n_params,
        "train_rows": len(data["train"]), "eval_rows": n_eval, "general_tokens": len(general),
        "train_label_tokens_per_epoch": tokens, "torch_threads": torch.get_num_threads(),
        "before": before, "summary": summary, "runs": runs,
        "build_seconds": round(built, 1), "wall_seconds": round(wall, 1),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
        print(f"json: {args.json_path}")
    if args.plot_path:
        write_plot(args.plot_path, runs, names, before, f"retention: {title}")
        print(f"plot: {args.plot_path}")
    print(f"wall time {wall:.0f} s" + (f" (of which building the embedded default {built:.0f} s)" if built else ""))
    return result


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
