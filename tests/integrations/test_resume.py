"""Trainer checkpoints of a patched model: aux decoders in their own file, restored (with their optimiser
state) on resume; 2 steps + save + resume + 2 steps equals 4 straight steps."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lopt_kernels
from helpers import RecordingCollator, VariableLengthSequences
from lopt_kernels.integrations import AUX_DECODERS_FILE
from tiny_models import tiny_model


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _trainer(out, seed, **kw):
    model = lopt_kernels.patch(tiny_model("llama", seed=seed))
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, learning_rate=3e-3, weight_decay=0.01, report_to=[],
                             use_cpu=True, seed=0, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1,
                             dataloader_num_workers=0, save_only_model=False, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=VariableLengthSequences(), data_collator=RecordingCollator())
    return lopt_kernels.attach(trainer)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_equals_straight_run(tmp_path):
    straight = _trainer(tmp_path / "a", seed=0, save_strategy="no")
    straight.train()
    expected = _params(straight.model)

    first = _trainer(tmp_path / "b", seed=0, save_strategy="steps", save_steps=2)
    first.add_callback(_StopAt(2))
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    assert (ckpt / AUX_DECODERS_FILE).is_file()
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lopt_aux_decoders") for k in f.keys()), "model weights stay standard"

    resumed = _trainer(tmp_path / "b", seed=123)  # different init: everything must come from the checkpoint
    resumed.args.save_strategy = "no"
    resumed.train(resume_from_checkpoint=True)
    got = _params(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)

    # the final save is a standard checkpoint
    resumed.save_model(str(tmp_path / "final"))
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not (tmp_path / "final" / AUX_DECODERS_FILE).exists()


def test_resume_without_decoder_file_is_an_error(tmp_path):
    trainer = _trainer(tmp_path, seed=0, save_strategy="steps", save_steps=1)
    trainer.add_callback(_StopAt(1))
    trainer.train()
    os.remove(tmp_path / "checkpoint-1" / AUX_DECODERS_FILE)
    again = _trainer(tmp_path, seed=0)
    with pytest.raises(FileNotFoundError, match="aux decoders cannot be restored"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
