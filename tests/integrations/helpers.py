"""Shared pieces of the trainer-integration tests: data, a batch-recording collator, a tiny offline tokenizer."""

from __future__ import annotations

import copy
import gc
import json
import os
import sys

import torch
from transformers import TrainerCallback

import lopt_kernels
from reference import ReferenceLoPT, even_starts, layer_list
from tiny_models import VOCAB, tiny_model


class VariableLengthSequences(torch.utils.data.Dataset):
    """Learnable sequences of different lengths (so micro-batches hold different label counts)."""

    def __init__(self, n=32, min_len=5, max_len=14, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            start, step = int(torch.randint(1, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
            self.rows.append((start + step * torch.arange(length)) % (VOCAB - 1) + 1)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


class RecordingCollator:
    """Right-pads and records every batch it builds (the Trainer's micro-batches, in order)."""

    def __init__(self, prompt=2):
        self.batches, self.prompt = [], prompt

    def __call__(self, rows):
        seq = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        mask = torch.zeros(len(rows), seq, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = r["input_ids"]
            mask[i, : len(r["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : self.prompt] = -100
        b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        self.batches.append({k: v.clone() for k, v in b.items()})
        return b


class GradCapture(TrainerCallback):
    """Copies every gradient just before each optimiser step."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: (None if p.grad is None else p.grad.detach().clone())
                           for n, p in self.model.named_parameters()})


def patched_and_reference(family="llama", lambda_aux=10.0, **model_kwargs):
    model = tiny_model(family, **model_kwargs)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, lambda_aux=lambda_aux)
    starts = even_starts(len(layer_list(original, family)), 2)
    ref = ReferenceLoPT(original, family, starts, lopt_kernels.aux_decoders(model), lambda_aux=lambda_aux)
    return model, ref


def reference_grads(ref, batches, *, num_items=None, divide=1.0):
    """Gradients of the reference's sum over micro-batches of ``(task + lambda * w * aux) / divide``."""
    ref.zero_grad()
    for b in batches:
        loss, _, _ = ref.step_loss(b, num_items)
        (loss / divide).backward()
    grads = {n: p.grad for n, p in ref.model.named_parameters()}
    for i, dec in enumerate(ref.decoders):
        grads.update({f"lopt_aux_decoders.{i}.{n}": p.grad for n, p in dec.named_parameters()})
    return grads


def window_label_count(batches):
    return sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)


def assert_grads_match(actual: dict, expected: dict, rtol=2e-4, names=None):
    names = expected.keys() if names is None else names
    for name in names:
        a, e = actual[name], expected[name]
        assert a is not None and e is not None, name
        err = (a.float() - e.float()).abs().max().item()
        assert err <= rtol * e.abs().max().item() + 1e-9, f"{name}: max err {err:.3e} vs scale {e.abs().max():.3e}"


# ----------------------------------------------------------------------------------------------
# a tiny tokenizer and model directory, built offline
# ----------------------------------------------------------------------------------------------

WORDS = ("the cat dog sat ran on a mat log red blue big small one two three four five six seven eight nine ten "
         "is was and or not yes no up down left right question answer count say").split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=64)


def tiny_llm_for(tokenizer, seed=0, **kw):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def sft_rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nums = "one two three four five six seven eight nine ten".split()
    rows = []
    for _ in range(n):
        a = int(torch.randint(0, 6, (1,), generator=g))
        length = int(torch.randint(2, 5, (1,), generator=g))
        rows.append({"prompt": "count " + nums[a], "completion": " ".join(nums[a + 1: a + 1 + length])})
    return rows


def exit_distributed_worker() -> None:
    """End a torchrun child once its results are on disk: tear the process group down, then leave
    without interpreter finalisation. Gloo's worker threads can still hold work objects whose
    destruction at finalisation aborts a finished run ("terminate called without an active exception",
    pytorch/pytorch#179291); that crash is torch's teardown, not the run under test."""
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
