"""Activation offloading composes with every LoPT mode: transformers' checkpoint offload
(``gradient_checkpointing_kwargs={"offload": True}``) and TRL's ``activation_offloading=True`` give the gradients
of the same run without offloading.

On this CPU-only machine both offloaders refuse to start as shipped (pinned memory needs an accelerator; TRL's
streams need a device stream). The tests start them as a GPU run would, minus pinning and streams: the
saved-tensor pack/unpack hooks run on every saved activation (the tests count them), so the code path under
test is the one a GPU run takes; only the copy's destination is the same device."""

import contextlib

import pytest
import torch

import lopt_kernels
from helpers import GradCapture, sft_rows, tiny_llm_for, tiny_tokenizer, write_jsonl
from tiny_models import batch, tiny_model

MODES = ("stored", "activation_free", "eager")
pytestmark = pytest.mark.explicit_modes


class _CountingSaveOnCpu:
    """transformers' ``save_on_cpu(pin_memory=True, device_type=...)`` without pinning; counts packed tensors."""

    def __init__(self):
        self.packed = 0

    def __call__(self, pin_memory=False, device_type="cuda"):
        real = torch.autograd.graph.save_on_cpu(pin_memory=False, device_type=device_type)
        pack, unpack = real.pack_hook, real.unpack_hook

        def counting_pack(t):
            self.packed += 1
            return pack(t)

        return torch.autograd.graph.saved_tensors_hooks(counting_pack, unpack)


def _grads(model, inputs, context=contextlib.nullcontext()):
    with context:
        out = model(**inputs)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, expected, what):
    assert got.keys() == expected.keys(), what
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-6, atol=1e-7, msg=f"{what}: {n}")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("mode", MODES)
def test_transformers_checkpoint_offload_gives_the_gradients_without_offloading(mode, reentrant, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    enable = getattr(modeling_utils.PreTrainedModel, "activation_checkpointing_enable", None)  # transformers >= 5.24
    if enable is None or "offload" not in __import__("inspect").signature(enable).parameters:
        pytest.skip("this transformers has no checkpoint offloading")
    saver = _CountingSaveOnCpu()
    monkeypatch.setattr(modeling_utils, "save_on_cpu", saver)
    inputs = batch()

    def build(offload):
        torch.manual_seed(0)
        model = lopt_kernels.patch(tiny_model("llama"), mode=mode)
        if offload:
            model.activation_checkpointing_enable({"use_reentrant": reentrant}, offload=True)
        return model.train()

    expected = _grads(build(False), inputs)
    got = _grads(build(True), inputs)
    assert saver.packed > 0, "the offloading hooks never ran"
    _assert_same(got, expected, f"{mode} + checkpoint offload")


class _HostModule:
    """``torch.cpu`` with the ``empty_cache`` it lacks: TRL's offloading context calls
    ``device_module.empty_cache()`` whenever bitsandbytes is imported, which only accelerator modules have."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def empty_cache():
        return None


def _trl_offloader(model, **_):
    """TRL's offloading context as SFTTrainer builds it, started on CPU: the host is the 'device', one stream, no
    pinning, every saved tensor offloaded (min size 0)."""
    from trl.models import activation_offloading

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu"))
        offloader = activation_offloading.get_act_offloading_ctx_manager(model=model, use_pin_memory=False,
                                                                         use_streams=False, min_offload_size=0)
    if not hasattr(offloader.device_module, "empty_cache"):
        offloader.device_module = _HostModule()
    return offloader


@pytest.mark.parametrize("mode", MODES)
def test_trl_activation_offloading_gives_the_gradients_without_offloading(mode):
    pytest.importorskip("trl")
    inputs = batch()

    def build():
        torch.manual_seed(0)
        return lopt_kernels.patch(tiny_model("llama"), mode=mode).train()

    expected = _grads(build(), inputs)
    model = build()
    offloader = _trl_offloader(model)
    got = _grads(model, inputs, offloader)
    assert offloader.tensor_id > 0, "the offloading hooks never ran"
    # every offloaded activation came back (eager's local backward inside the forward included)
    assert not offloader.tracker
    _assert_same(got, expected, f"{mode} + TRL activation offloading")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sft_trainer_offloading_gives_the_gradients_without_offloading(mode, tmp_path, monkeypatch):
    """SFTTrainer with checkpointing; offloading by TRL (``activation_offloading=True``) or by transformers
    (``gradient_checkpointing_kwargs={"offload": True}``, which the Trainer hands to the model)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers.modeling_utils as modeling_utils
    import trl.trainer.sft_trainer as sft_trainer

    offloaders = []

    def offloader(model, **kw):
        offloaders.append(_trl_offloader(model))
        return offloaders[-1]

    monkeypatch.setattr(sft_trainer, "get_act_offloading_ctx_manager", offloader)
    saver = _CountingSaveOnCpu()
    monkeypatch.setattr(modeling_utils, "save_on_cpu", saver)
    tok = tiny_tokenizer()
    data = datasets.load_dataset("json", data_files=str(write_jsonl(tmp_path / "sft.jsonl", sft_rows(12))),
                                 split="train")

    def train(offload):
        model = lopt_kernels.patch(tiny_llm_for(tok), mode=mode)
        checkpointing = {"use_reentrant": False, **({"offload": True} if offload == "checkpoint" else {})}
        args = trl.SFTConfig(output_dir=str(tmp_path / f"out-{offload}"), max_steps=2, per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, learning_rate=1e-3, max_grad_norm=0.0, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, logging_steps=1, lr_scheduler_type="constant",
                             dataloader_num_workers=0, max_length=32, bf16=False, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs=checkpointing, activation_offloading=offload == "trl")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        capture = GradCapture(model)
        trainer.add_callback(capture)
        lopt_kernels.attach(trainer)
        trainer.train()
        return capture.steps

    expected = train(None)
    assert not offloaders and saver.packed == 0
    for offload in ("trl", "checkpoint"):
        got = train(offload)
        if offload == "trl":
            assert offloaders and offloaders[-1].tensor_id > 0, "SFTTrainer never offloaded"
        else:
            assert saver.packed > 0, "the checkpoint offload never ran"
        assert len(got) == len(expected) == 2
        for step, (g, e) in enumerate(zip(got, expected)):
            names = [n for n, v in e.items() if v is not None]
            assert names and [n for n, v in g.items() if v is not None] == names
            _assert_same({n: g[n] for n in names}, {n: e[n] for n in names}, f"{mode} + {offload}: SFT step {step}")
