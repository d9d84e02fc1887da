"""TRL's SFTTrainer (fused LM head: never reads outputs.loss) and GRPOTrainer (its own policy loss) with
lopt_kernels.attach: both halves train, with the reference's relative weight lambda_aux."""

import pytest
import torch

import lopt_kernels
from helpers import GradCapture, assert_grads_match, sft_rows, tiny_llm_for, tiny_tokenizer, write_jsonl

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

GA = 2
LAMBDA = 10.0


def _reference_for(model, lambda_aux=LAMBDA):
    import copy

    from reference import ReferenceLoPT

    original = copy.deepcopy(model)
    lopt_kernels.patch(model, lambda_aux=lambda_aux)
    return ReferenceLoPT(original, "llama", [0, 2, 4], lopt_kernels.aux_decoders(model), lambda_aux=lambda_aux)


def _ref_grads(ref):
    grads = {n: p.grad for n, p in ref.model.named_parameters()}
    grads.update({f"lopt_aux_decoders.0.{n}": p.grad for n, p in ref.decoders[0].named_parameters()})
    return grads


BOTTOM = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
          "lopt_aux_decoders.0.norm.weight", "lopt_aux_decoders.0.down.weight", "lopt_aux_decoders.0.up.weight"]
TOP = ["model.layers.3.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]


def _changed(before, model, names):
    now = dict(model.named_parameters())
    return [n for n in names if not torch.equal(before[n], now[n].detach())]


@pytest.mark.slow
def test_sft_trainer_trains_both_halves_with_the_reference_weighting(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llm_for(tok)
    ref = _reference_for(model)
    data = datasets.load_dataset("json", data_files=str(write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))),
                                 split="train")
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=3,
                         gradient_accumulation_steps=GA, learning_rate=1e-3, max_grad_norm=0.0, report_to=[],
                         save_strategy="no", use_cpu=True, seed=0, logging_steps=1, lr_scheduler_type="constant",
                         dataloader_num_workers=0, max_length=32, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    batches = []
    collate = trainer.data_collator

    def recording(rows):
        out = collate(rows)
        batches.append({k: v.clone() for k, v in out.items() if torch.is_tensor(v)})
        return out

    trainer.data_collator = recording
    capture = GradCapture(model)
    trainer.add_callback(capture)
    lopt_kernels.attach(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    # step 1 against the reference loop: sum over micro-batches of (CE_sum/N + lambda * n_mb/N * aux)
    window = batches[:GA]
    assert all("labels" in b for b in window)
    n = sum(int((b["labels"][..., 1:] != -100).sum()) for b in window)
    ref.zero_grad()
    for b in window:
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "labels") if k in b}
        loss, _, _ = ref.step_loss(inputs, torch.tensor(n))
        loss.backward()
    assert_grads_match(capture.steps[0], _ref_grads(ref), rtol=1e-3, names=BOTTOM + TOP)

    assert _changed(before, model, BOTTOM) == BOTTOM
    assert _changed(before, model, TOP) == TOP
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["aux_loss"] > 0 for h in logs)


def _digit_reward(completions, **kwargs):
    """A toy reward with variance: how many number words the completion holds."""
    nums = set("one two three four five six seven eight nine ten".split())
    return [float(sum(w in nums for w in str(c).split())) for c in completions]


@pytest.mark.slow
def test_grpo_trainer_trains_both_halves_with_the_reference_weighting(tmp_path):
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    model = tiny_llm_for(tok)
    ref = _reference_for(model)
    prompts = [{"prompt": r["prompt"]} for r in sft_rows(8, seed=1)]
    data = datasets.load_dataset("json", data_files=str(write_jsonl(tmp_path / "p.jsonl", prompts)), split="train")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                          gradient_accumulation_steps=GA, num_generations=4, max_completion_length=4,
                          learning_rate=1e-3, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
                          seed=0, logging_steps=1, lr_scheduler_type="constant", dataloader_num_workers=0,
                          temperature=1.0, beta=0.0, bf16=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_digit_reward, args=args, train_dataset=data,
                              processing_class=tok)
    forwards = []

    def record(module, args, kwargs):  # every training forward of the policy (generation runs under no_grad)
        if module.training and torch.is_grad_enabled():
            forwards.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask")})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    capture = GradCapture(model)
    trainer.add_callback(capture)
    lopt_kernels.attach(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    handle.remove()

    # the bottom half's gradient is the reference's lambda * aux / GA per micro-batch (GRPO divides by GA)
    window = forwards[:GA]
    assert len(forwards) == 2 * GA
    ref.zero_grad()
    for f in window:
        _, _, aux = ref.step_loss({**f, "labels": f["input_ids"]})
        (LAMBDA * aux / GA).backward()
    assert_grads_match(capture.steps[0], _ref_grads(ref), rtol=1e-3, names=BOTTOM)

    assert _changed(before, model, BOTTOM) == BOTTOM
    assert _changed(before, model, TOP), "the policy loss trains the top half"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["aux_loss"] > 0 for h in logs)


def _dpo_pairs(tmp_path):
    rows = sft_rows(8, seed=2)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] + " no"} for r in rows]
    return datasets.load_dataset("json", data_files=str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), split="train")


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["unpatched", "patched"])
def test_dpo_sync_ref_model_needs_a_patched_reference(tmp_path, ref):
    # TRL's SyncRefModelCallback (sync_ref_model=True) zips the reference's parameters with the policy's
    # (strict=True): the policy's aux decoders made it fail after the first step with "zip() argument 2 is longer
    # than argument 1", and for a tied family the untied head would shift every later pair. attach now refuses it
    # up front, naming the fix; a reference patched the same way lines up (in eval mode its logits are unpatched).
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    tiny_llm_for(tok, tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    model = lopt_kernels.patch(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    ref_model = None
    if ref == "patched":
        ref_model = lopt_kernels.patch(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
                         sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dpo_pairs(tmp_path),
                             processing_class=tok)
    if ref == "unpatched":
        with pytest.raises(lopt_kernels.LoptPatchError, match="sync_ref_model"):
            lopt_kernels.attach(trainer)
        return
    lopt_kernels.attach(trainer)
    before = trainer.ref_model.model.embed_tokens.weight.detach().clone()
    trainer.train()
    after = trainer.ref_model.model.embed_tokens.weight
    torch.testing.assert_close(after, 0.5 * before + 0.5 * model.model.embed_tokens.weight.detach())
    assert not trainer.ref_model.training
