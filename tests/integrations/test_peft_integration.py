"""PEFT LoRA with patch() before or after get_peft_model: trainable aux decoders, reference gradients,
merge_and_unload and unpatch in either order."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import lopt_kernels
from helpers import RecordingCollator, VariableLengthSequences
from lopt_kernels.integrations import ensure_aux_trainable
from reference import ReferenceLoPT, even_starts
from tiny_models import batch, tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora(model, targets=TARGETS):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(7)  # the same adapters whichever model they wrap
    return get_peft_model(model, config)


def _build(order):
    base = tiny_model("llama")
    if order == "patch_before_peft":
        model = _lora(lopt_kernels.patch(copy.deepcopy(base)))
    else:
        model = lopt_kernels.patch(_lora(copy.deepcopy(base)))
    return base, model


@pytest.mark.parametrize("order", ["patch_before_peft", "patch_after_peft"])
def test_lora_and_decoder_gradients_match_the_reference(order):
    base, model = _build(order)
    decoders = lopt_kernels.aux_decoders(model)
    if order == "patch_before_peft":
        assert not any(p.requires_grad for p in decoders[0].parameters()), "get_peft_model froze them"
    ensure_aux_trainable(model)
    assert all(p.requires_grad for p in decoders[0].parameters())

    ref_peft = _lora(copy.deepcopy(base))
    ref_peft.load_state_dict({k: v for k, v in model.state_dict().items() if "lopt_aux" not in k}, strict=False)
    ref = ReferenceLoPT(ref_peft.get_base_model(), "llama", even_starts(5, 2), decoders)
    b = batch()
    n = torch.tensor(int((b["labels"][..., 1:] != -100).sum()) + 4)
    out = model(**b, num_items_in_batch=n)
    out.loss.backward()
    loss, _, _ = ref.step_loss(b, n)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)

    ref_grads = {n_: p.grad for n_, p in ref.model.named_parameters() if "lora_" in n_}
    got = {n_.removeprefix("base_model.model."): p.grad for n_, p in model.named_parameters() if "lora_" in n_}
    assert got.keys() == ref_grads.keys() and len(got) == 30
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert all(got[k].abs().max() > 0 for k in got if "layers.0." in k), "bottom adapters trained (local loss)"
    for p, q in zip(decoders[0].parameters(), ref.decoders[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("order", ["patch_before_peft", "patch_after_peft"])
def test_trainer_trains_decoders_and_adapters(tmp_path, order):
    _, model = _build(order)
    dec_before = [p.detach().clone() for p in lopt_kernels.aux_decoders(model)[0].parameters()]
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = lopt_kernels.attach(Trainer(model=model, args=args, train_dataset=VariableLengthSequences(),
                                          data_collator=RecordingCollator()))
    trainer.train()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(dec_before, lopt_kernels.aux_decoders(model)[0].parameters()))
    now = dict(model.named_parameters())
    assert all(not torch.equal(v, now[n].detach()) for n, v in lora_before.items() if ".layers.0." in n)


def _logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.mark.parametrize("sequence", [
    "patch_peft_merge_unpatch", "peft_patch_merge_unpatch", "peft_patch_unpatch_merge", "patch_peft_unpatch_merge",
])
def test_merge_and_unload_and_unpatch_compose(tmp_path, sequence):
    b = batch()
    base = tiny_model("llama")
    plain = _lora(copy.deepcopy(base)).merge_and_unload()  # the same adapters, merged, never patched
    expected = _logits(plain, b)

    model = copy.deepcopy(base)
    for step in sequence.split("_"):
        if step == "patch":
            model = lopt_kernels.patch(model)
        elif step == "peft":
            model = _lora(model)
        elif step == "merge":
            model = model.merge_and_unload()
            assert not type(model).__name__.startswith("Peft")
            if sequence.index("unpatch") > sequence.index("merge"):
                assert lopt_kernels.is_patched(model), "merging keeps the patch"
                model.train()
                out = model(**b)  # still a LoPT model: training forward carries the aux term
                torch.testing.assert_close(out.loss, out.task_loss + 10.0 * out.aux_loss)
        elif step == "unpatch":
            model = lopt_kernels.unpatch(model)
    assert not lopt_kernels.is_patched(model)
    torch.testing.assert_close(_logits(model, b), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_adapters_inside_the_aux_decoders_are_refused():
    model = _lora(lopt_kernels.patch(tiny_model("llama")), targets="all-linear")
    with pytest.raises(lopt_kernels.LoptPatchError, match="adapter into an aux decoder"):
        ensure_aux_trainable(model)
