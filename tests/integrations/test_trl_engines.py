"""TRL's trainers + attach under the distributed engines as users configure them (2 gloo processes on CPU) equal one
process without the engine on the same global batch: SFTTrainer under accelerate's FSDP2 (full fine-tune of a tied
Qwen2, LoRA on Llama), GRPOTrainer under accelerate's FSDP2 (full fine-tune and LoRA on Llama), GRPOTrainer + LoRA
under DDP, SFTTrainer under DeepSpeed ZeRO-3 (GPT-2) and ZeRO-2 (Phi-3 LoRA), GRPOTrainer (full fine-tune and LoRA)
under ZeRO-2. The same runs without LoPT agree as closely (the sweeps behind these: 4e-9 to 3e-8 either way)."""

import pytest
import torch

from test_distributed import _torchrun

pytest.importorskip("trl")
pytestmark = [pytest.mark.slow, pytest.mark.explicit_modes]


def _check(tmp_path, engine):
    import trl_engines_train as script

    _torchrun("trl_engines_train.py", str(tmp_path), engine)
    cases = [c for c, spec in script.CASES.items() if spec[0] == engine or (engine == "zero" and spec[0][:4] == "zero")]
    for case in cases:
        assert int((tmp_path / f"{case}.engine").read_text()) > 0, f"{case}: the engine did not take the model"
        got = torch.load(tmp_path / f"{case}.pt")
        want, _ = script.run(str(tmp_path), case, world=1)
        assert got.keys() == want.keys(), case
        assert any("lopt_aux_decoders" in n for n in want), case
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")


def test_sft_and_grpo_trainers_under_accelerate_fsdp2_equal_one_process(tmp_path):
    _check(tmp_path, "fsdp2")


def test_grpo_trainer_lora_under_ddp_equals_one_process(tmp_path):
    _check(tmp_path, "ddp")


def test_sft_and_grpo_under_zero2_and_zero3_on_other_families_equal_one_process(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed", reason="pip install '.[deepspeed]' (see .ci/run)")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    _check(tmp_path, "zero")
