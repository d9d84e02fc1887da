"""The embedded default of examples/retention.py, built locally (no download) and cached.

- General text: the prose of the standard library's ``pydoc_data.topics`` (ships with every CPython).
  The topics are split by name: every ``HELD_OUT_EVERY``-th one is held out (the general-text eval file);
  the rest pretrain the model.
- Tokenizer: a byte-level BPE trained by ``tokenizers`` on the pretraining topics, digits split one
  per token (as Llama's tokenizer does), ``<|endoftext|>`` as bos/eos/pad.
- Model: a small Llama (``LlamaForCausalLM``, untied head) pretrained on those topics.
- Task: multi-digit addition in a fixed format, ``{"prompt": "47+58=", "completion": "105"}``,
  distinct problems, in a jsonl file.

Everything lands in ``<cache>/`` (the model in ``<cache>/<tag>/``, the tag naming its sizes), built once;
a later run loads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"
HELD_OUT_EVERY = 8
BUILD_VERSION = 2


@dataclass(frozen=True)
class PretrainSpec:
    vocab: int = 1024
    d_model: int = 128
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 384
    seq: int = 128
    batch: int = 16
    steps: int = 400
    lr: float = 3e-3
    seed: int = 0

    def tag(self) -> str:
        blob = json.dumps({**asdict(self), "version": BUILD_VERSION}, sort_keys=True).encode()
        return f"llama-d{self.d_model}-l{self.layers}-v{self.vocab}-s{self.steps}-{hashlib.sha1(blob).hexdigest()[:8]}"


SMOKE = PretrainSpec(vocab=300, d_model=32, layers=4, heads=2, kv_heads=1, ffn=64, seq=32, batch=4, steps=3)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lopt_kernels" / "retention"


def pydoc_topics() -> tuple[list[str], list[str]]:
    """(pretraining texts, held-out texts): pydoc_data topics split by sorted name."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY != HELD_OUT_EVERY // 2]
    held = [topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    return train, held


def _paragraphs(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        out.extend(p.strip() for p in t.split("\n\n") if p.strip())
    return out


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=1_000_000)


def addition_rows(n: int, digits: int, seed: int) -> list[dict]:
    """``n`` distinct problems ``a+b=`` with ``digits``-digit operands (no leading zeros)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rng = random.Random(seed)
    seen, rows = set(), []
    n = min(n, (hi - lo + 1) ** 2)
    while len(rows) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats) on up to ``max_windows`` consecutive windows of ``ids``."""
    was = model.training
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq)
    x = torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(n)])
    loss = 0.0
    for i in range(0, n, 16):
        chunk = x[i: i + 16]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train(was)
    return loss / (n * seq)


def pretrain(spec: PretrainSpec, tokenizer, texts: list[str], log=print, held_out: list[str] | None = None,
             record: dict | None = None):
    """A small Llama trained on ``texts`` (concatenated, EOS-separated) for ``spec.steps`` AdamW steps,
    cosine schedule with warm-up. With ``held_out`` texts, their loss is measured at every log point (10 a run)
    and, with ``record``, the curves (``train_loss``, ``held_out_loss`` as [step, loss]), ``tokens`` and
    ``seconds`` are written into it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    data = _token_stream(tokenizer, texts)
    held = _token_stream(tokenizer, held_out) if held_out else None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.d_model, intermediate_size=spec.ffn,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=max(256, spec.seq),
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, spec.steps) / spec.steps)))
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    started = time.perf_counter()
    for step in range(spec.steps):
        starts = torch.randint(0, len(data) - spec.seq - 1, (spec.batch,), generator=g)
        batch = torch.stack([data[s: s + spec.seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, spec.steps // 10) == 0 or step == spec.steps - 1:
            ho = held_out_loss(model, held, spec.seq) if held is not None and len(held) > spec.seq + 1 else None
            if record is not None:
                record.setdefault("train_loss", []).append([step + 1, loss.item()])
                if ho is not None:
                    record.setdefault("held_out_loss", []).append([step + 1, ho])
            log(f"pretrain step {step + 1}/{spec.steps}: loss {loss.item():.3f}"
                + ("" if ho is None else f", held-out {ho:.3f}") + f" ({time.perf_counter() - started:.0f} s)")
    if record is not None:
        record.update(tokens=spec.steps * spec.batch * spec.seq, seconds=round(time.perf_counter() - started, 1),
                      parameters=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads())
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_default(cache_dir, spec: PretrainSpec = PretrainSpec(), *, model: bool = True, task_rows: int = 6000,
                  digits: int = 2, log=print) -> dict:
    """Build (once) the default task data (``task_rows`` distinct ``digits``-digit additions) and general text
    and, with ``model=True``, the pretrained model; return their paths (``model``, ``task_data``,
    ``general_data``) and ``built_seconds`` (0.0 when all were cached)."""
    root = Path(cache_dir)
    paths = {"model": root / spec.tag(), "task_data": root / f"addition-d{digits}-n{task_rows}.jsonl",
             "general_data": root / f"pydoc-held-out-v{BUILD_VERSION}.jsonl"}
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = pydoc_topics()
    if not paths["general_data"].exists():
        _write_jsonl(paths["general_data"], [{"text": p} for p in _paragraphs(held_texts)])
    if not paths["task_data"].exists():
        _write_jsonl(paths["task_data"], addition_rows(task_rows, digits, seed=0))
    if model and not (paths["model"] / "config.json").exists():
        log(f"building the embedded default model in {paths['model']} (once; later runs load it)")
        tokenizer = train_tokenizer(train_texts, spec.vocab)
        record: dict = {}
        lm = pretrain(spec, tokenizer, train_texts, log=log, held_out=held_texts, record=record)
        tmp = root / f"{spec.tag()}.tmp{os.getpid()}"
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lopt_retention_spec.json").write_text(json.dumps({**asdict(spec), "pretraining": record}, indent=1))
        tmp.replace(paths["model"])
        return {**paths, "built_seconds": time.perf_counter() - started}
    return {**paths, "built_seconds": 0.0}
