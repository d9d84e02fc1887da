"""QLoRA (a bitsandbytes 4-bit base, PEFT LoRA adapters on it): every mode trains as the LoPT reference does."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import lopt_kernels  # noqa: E402
from reference import ReferenceLoPT, even_starts  # noqa: E402
from tiny_models import batch, tiny_model  # noqa: E402


def _qlora(path, checkpointing):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    return get_peft_model(model, config).train()


@pytest.mark.explicit_modes
@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_trains_as_the_reference_in_every_mode(tmp_path, checkpointing):
    tiny_model("llama").save_pretrained(tmp_path)
    b = batch()
    for mode in ("eager", "activation_free", "stored"):
        model = lopt_kernels.patch(_qlora(tmp_path, checkpointing), mode=mode)
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        decoders = lopt_kernels.aux_decoders(model)
        ref = ReferenceLoPT(_qlora(tmp_path, False).get_base_model(), "llama", even_starts(5, 2), decoders)
        out = model(**b)
        out.loss.backward()
        loss, _, _ = ref.step_loss(b)
        loss.backward()
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
        ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if "lora_" in n}
        got = {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if "lora_" in n}
        assert got.keys() == ref_grads.keys() and len(got) == 30, mode
        for name, g in ref_grads.items():
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-7, msg=f"{mode}: {name}")
        for p, q in zip(decoders[0].parameters(), ref.decoders[0].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8, msg=mode)
