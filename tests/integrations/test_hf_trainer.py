"""HF Trainer + lopt_kernels.attach: gradient accumulation, num_items_in_batch, a custom loss, logging."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lopt_kernels
from helpers import (GradCapture, RecordingCollator, VariableLengthSequences, assert_grads_match,
                     patched_and_reference, reference_grads, window_label_count)

GA = 2


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, gradient_accumulation_steps=GA,
                learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                max_grad_norm=0.0, lr_scheduler_type="constant", dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _sum_ce(outputs, labels, num_items_in_batch=None):
    """A custom loss from the logits (never reads outputs.loss): the summed shifted CE over the window's count."""
    logits = outputs.logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


@pytest.mark.parametrize("variant,family,checkpointing", [
    ("num_items_in_batch", "llama", False), ("divide_by_ga", "llama", False), ("compute_loss_func", "llama", False),
    # a MoE model (router loss in its task loss) with checkpointing: in eager mode the bottom blocks' recompute ran
    # inside the forward and transformers recorded their routers' logits twice, so the task loss backpropagated
    # into the freed bottom graphs (RuntimeError: backward through the graph a second time)
    ("num_items_in_batch", "mixtral", True),
])
def test_one_step_gradients_equal_the_reference_loop(tmp_path, variant, family, checkpointing):
    model, ref = patched_and_reference(family)
    collator = RecordingCollator()
    args = _args(tmp_path, gradient_checkpointing=checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=VariableLengthSequences(),
                      data_collator=collator, compute_loss_func=_sum_ce if variant == "compute_loss_func" else None)
    if variant == "divide_by_ga":
        trainer.model_accepts_loss_kwargs = False  # the Trainer then divides each micro-batch loss by GA
    capture = GradCapture(model)
    trainer.add_callback(capture)
    lopt_kernels.attach(trainer)
    trainer.train()

    batches = collator.batches[:GA]
    n = window_label_count(batches)
    assert len({int((b["labels"][..., 1:] != -100).sum()) for b in batches}) > 1, "micro-batches should differ in size"
    if variant == "divide_by_ga":
        expected = reference_grads(ref, batches, divide=GA)
    else:
        expected = reference_grads(ref, batches, num_items=torch.tensor(n))
    grads = capture.steps[0]
    assert_grads_match(grads, expected)
    # the bottom half and the decoder are trained, by the local loss only
    assert grads["model.layers.0.self_attn.o_proj.weight"].abs().max() > 0
    assert grads["lopt_aux_decoders.0.up.weight"].abs().max() > 0


class _KwargsComputeLoss(Trainer):
    """A user's compute_loss override that takes num_items_in_batch through **kwargs and names its batch argument
    differently: its own summed CE over the window's label count (the Trainer then does not divide by GA)."""

    def compute_loss(self, model, batch, return_outputs=False, **kwargs):
        labels = batch.pop("labels")
        outputs = model(**batch)
        loss = _sum_ce(outputs, labels, kwargs["num_items_in_batch"])
        return (loss, outputs) if return_outputs else loss


def test_compute_loss_override_with_kwargs_weights_the_aux_term_by_label_share(tmp_path):
    # attach read num_items_in_batch and the labels only by their parameter names: with **kwargs (or another name for
    # the batch) it saw neither, weighted each micro-batch's aux by 1 instead of n_mb / num_items_in_batch, and the
    # bottom half's gradients came out about GA times too large (1.95x at GA 2 on llama)
    model, ref = patched_and_reference("llama")
    collator = RecordingCollator()
    trainer = _KwargsComputeLoss(model=model, args=_args(tmp_path), train_dataset=VariableLengthSequences(),
                                 data_collator=collator)
    capture = GradCapture(model)
    trainer.add_callback(capture)
    lopt_kernels.attach(trainer)
    trainer.train()
    batches = collator.batches[:GA]
    expected = reference_grads(ref, batches, num_items=torch.tensor(window_label_count(batches)))
    assert_grads_match(capture.steps[0], expected)


def test_model_init_trains_the_model_the_trainer_builds_in_train(tmp_path):
    # With model_init, Trainer.train() builds a new model; attach recorded the aux loss of the one it saw at attach
    # time, so a trainer that builds its own loss (here compute_loss_func) never added the aux term: the trained
    # model's bottom half and decoders got no gradient (logged task_loss 0, aux_loss 0)
    import copy

    from reference import ReferenceLoPT, even_starts
    from tiny_models import tiny_model
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.trainer, self.ref, self.grads = None, None, []

        def on_train_begin(self, args, state, control, **kwargs):
            model = self.trainer.model
            original = lopt_kernels.unpatch(copy.deepcopy(model))
            self.ref = ReferenceLoPT(original, "llama", even_starts(5, 2), lopt_kernels.aux_decoders(model))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads.append({n: None if p.grad is None else p.grad.clone()
                               for n, p in self.trainer.model.named_parameters()})

    collator = RecordingCollator()
    trainer = Trainer(model_init=lambda: lopt_kernels.patch(tiny_model("llama")), args=_args(tmp_path),
                      train_dataset=VariableLengthSequences(), data_collator=collator, compute_loss_func=_sum_ce)
    snapshot = Snapshot()
    snapshot.trainer = trainer
    trainer.add_callback(snapshot)
    lopt_kernels.attach(trainer)
    trainer.train()
    batches = collator.batches[:GA]
    expected = reference_grads(snapshot.ref, batches, num_items=torch.tensor(window_label_count(batches)))
    assert_grads_match(snapshot.grads[0], expected)
    assert [h for h in trainer.state.log_history if "loss" in h][0]["aux_loss"] > 0


def test_task_and_aux_losses_are_logged_separately(tmp_path):
    model, _ = patched_and_reference()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=VariableLengthSequences(),
                      data_collator=RecordingCollator())
    lopt_kernels.attach(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["aux_loss"] > 0 and h["task_loss"] > 0
        assert h["loss"] == pytest.approx(h["task_loss"] + 10.0 * h["aux_loss"], rel=1e-4)


def test_attach_requires_a_patched_model_and_is_idempotent(tmp_path):
    from tiny_models import tiny_model

    trainer = Trainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=VariableLengthSequences(),
                      data_collator=RecordingCollator())
    with pytest.raises(lopt_kernels.LoptPatchError, match="not patched"):
        lopt_kernels.attach(trainer)
    lopt_kernels.patch(trainer.model)
    lopt_kernels.attach(trainer)
    lopt_kernels.attach(trainer)
    assert sum(isinstance(c, lopt_kernels.LoptCallback) for c in trainer.callback_handler.callbacks) == 1
    assert isinstance(trainer.callback_handler.callbacks[0], lopt_kernels.LoptCallback)
