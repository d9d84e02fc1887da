"""A plain transformers.Trainer run on a patched model."""

import torch
from transformers import Trainer, TrainingArguments

import lopt_kernels
from tiny_models import VOCAB, tiny_model


class _RepeatingSequences(torch.utils.data.Dataset):
    """Sequences that continue an arithmetic pattern: learnable in a few steps."""

    def __init__(self, n=80, seq=12):
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(1, VOCAB, (n,), generator=g)
        steps = torch.randint(1, 4, (n,), generator=g)
        self.rows = [((s + st * torch.arange(seq)) % (VOCAB - 1) + 1) for s, st in zip(starts, steps)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def test_trainer_lowers_loss_and_trains_both_halves(tmp_path):
    model = tiny_model("llama")
    lopt_kernels.patch(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_RepeatingSequences())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 * 0.9, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "model.embed_tokens.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
    assert "model.layers.4.mlp.down_proj.weight" in changed and "lm_head.weight" in changed
    assert any(n.startswith("lopt_aux_decoders.0.") for n in changed)
