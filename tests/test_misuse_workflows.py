"""Ordinary own-loop workflows that once trained the wrong thing without a word: an optimiser built before
``patch``, ``get_peft_model`` after it, a loss on a bottom block's recorded hidden state, a loss function or head
adapter set after the first step, accelerate's mixed-precision ``prepare``.

Tests that apply to every boundary mode take ``mode`` (the conftest's default modes, plus ``stored``).
"""

import copy
import functools
import warnings

import pytest
import torch

import lopt_kernels
from lopt_kernels.discovery import LoptPatchError
from lopt_kernels.integrations import ensure_aux_trainable
from tiny_models import batch, tiny_model


def _decoder_weights(model):
    return [p.detach().clone() for d in lopt_kernels.aux_decoders(model) for p in d.parameters()]


def _step(model, optimizers, b):
    model(**b).loss.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


# -- an optimiser built before patch never trains the decoders ----------------------------------------------


def test_optimizer_built_before_patch_is_refused_at_the_next_forward(mode):
    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lopt_kernels.patch(model, mode=mode)
    b = batch()
    _step(model, [opt], b)
    with pytest.raises(LoptPatchError, match="no optimiser holds its 6 trainable aux decoder"):
        model(**b)
    # the fix the message names: add the decoders, and training goes on
    opt.add_param_group({"params": [p for d in lopt_kernels.aux_decoders(model) for p in d.parameters()]})
    before = _decoder_weights(model)
    _step(model, [opt], b)
    _step(model, [opt], b)
    assert all(not torch.equal(a, p) for a, p in zip(before, _decoder_weights(model)))


def test_optimizers_built_after_patch_or_split_in_two_pass(lopt_default_mode):
    b = batch()
    model = lopt_kernels.patch(tiny_model("llama"))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        _step(model, [opt], b)
    # the task side first, the bottom and the decoders in an optimiser of their own that steps second
    model = lopt_kernels.patch(tiny_model("llama"))
    top, local = lopt_kernels.param_groups(model, lr=1e-2)
    optimizers = [torch.optim.SGD(top["params"], lr=1e-2), torch.optim.SGD(local["params"], lr=1e-2)]
    before = _decoder_weights(model)
    for _ in range(3):
        _step(model, optimizers, b)
    assert all(not torch.equal(a, p) for a, p in zip(before, _decoder_weights(model)))


def test_decoders_frozen_on_purpose_are_not_refused(lopt_default_mode):
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lopt_kernels.patch(model)
    for p in lopt_kernels.aux_decoders(model)[0].parameters():
        p.requires_grad_(False)
    b = batch()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for _ in range(2):
            _step(model, [opt], b)


# -- get_peft_model after patch freezes the decoders ---------------------------------------------------------


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_peft_after_patch_trains_the_decoders_as_ensure_aux_trainable_does(mode):
    b = batch()
    expected = _lora(lopt_kernels.patch(tiny_model("llama"), mode=mode))
    ensure_aux_trainable(expected)
    got = _lora(lopt_kernels.patch(tiny_model("llama"), mode=mode))  # the user forgets ensure_aux_trainable
    assert not any(p.requires_grad for d in lopt_kernels.aux_decoders(got) for p in d.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_out = got(**b)
    assert any("PEFT froze them" in str(w.message) for w in caught)
    expected_out = expected(**b)
    torch.testing.assert_close(got_out.loss, expected_out.loss)
    got_out.loss.backward()
    expected_out.loss.backward()
    grads = {n: p.grad for n, p in expected.named_parameters() if p.requires_grad}
    assert {n for n, p in got.named_parameters() if p.requires_grad} == set(grads)
    for name, p in got.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for d in lopt_kernels.aux_decoders(got) for p in d.parameters())


def test_optimizer_from_a_requires_grad_filter_before_the_first_forward_is_refused(lopt_default_mode):
    b = batch()
    model = _lora(lopt_kernels.patch(tiny_model("llama")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _step(model, [opt], b)
    with pytest.raises(LoptPatchError, match="no optimiser holds"):
        model(**b)


def test_frozen_decoders_without_peft_warn(lopt_default_mode):
    model = lopt_kernels.patch(tiny_model("llama"))
    for p in lopt_kernels.aux_decoders(model)[0].parameters():
        p.requires_grad_(False)
    with pytest.warns(UserWarning, match="aux decoders are frozen"):
        model(**batch())
    assert not any(p.requires_grad for p in lopt_kernels.aux_decoders(model)[0].parameters())


# -- a loss on a bottom block's recorded hidden state --------------------------------------------------------


def _grads_with_record_loss(mode, key, index):
    model = lopt_kernels.patch(tiny_model("llama", attn="eager"), mode=mode)
    out = model(**batch(), output_hidden_states=True, output_attentions=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out.loss + out[key][index].float().pow(2).mean()).backward()
    warned = any("recorded inside a non-final block" in str(w.message) for w in caught)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, warned, out


@pytest.mark.explicit_modes
@pytest.mark.parametrize("key,index,cut", [("hidden_states", 1, True), ("hidden_states", 3, True),
                                           ("attentions", 0, True), ("hidden_states", 4, False),
                                           ("hidden_states", 0, False)])
def test_one_behaviour_in_every_mode_for_a_loss_on_recorded_states(key, index, cut):
    """Layers 0-2 are the bottom block of a 5-layer model: their outputs (hidden_states[1..3]) and attention maps are
    cut (a warning, no gradient into the block); the final block's states (hidden_states[4]) train it, and the
    embeddings' output (hidden_states[0], block 0's input) trains the embeddings, in every mode alike."""
    plain = lopt_kernels.patch(tiny_model("llama", attn="eager"), mode="stored")
    plain(**batch()).loss.backward()
    without_term = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    results = {m: _grads_with_record_loss(m, key, index) for m in ("stored", "eager", "activation_free")}
    reference, _, _ = results["stored"]
    for m, (grads, warned, out) in results.items():
        assert len(out.hidden_states) == 6 and len(out.attentions) == 5
        assert warned == cut, m
        assert set(grads) == set(reference), m
        for name, g in grads.items():
            torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-7, msg=f"{m} {name}")
    changed = [n for n in reference if not torch.allclose(reference[n], without_term[n], rtol=1e-5, atol=1e-8)]
    if cut:
        assert changed == []
    else:
        assert changed  # the term trains what it reaches


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_recorded_states_are_recorded_once_with_checkpointing(mode):
    """With gradient checkpointing, eager mode's local backward recomputes the bottom layers inside the forward:
    transformers' output capture recorded their attention maps again (8 for 5 layers; a MoE model's router logits
    likewise, whose router loss then reached the freed bottom graphs)."""
    model = lopt_kernels.patch(tiny_model("llama", attn="eager"), mode=mode)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    out = model(**batch(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 6 and len(out.attentions) == 5
    out.loss.backward()


# -- the fused task-loss decision follows the model after the first step ------------------------------------


def _offset_loss(logits, labels, vocab_size, **kwargs):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size, **kwargs) + 0.25


def test_loss_function_set_after_a_step_is_honoured(lopt_default_mode):
    b = batch()
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    reference.loss_function = _offset_loss
    lopt_kernels.patch(model)
    model(**b).loss.backward()
    model.loss_function = _offset_loss
    with pytest.warns(UserWarning, match="uses its own loss function"):
        out = model(**b)
    torch.testing.assert_close(out.task_loss, reference(**b).loss, rtol=1e-5, atol=1e-6)
    # and back: the fused loss again, no logits
    del model._loss_function  # the model's default loss again
    assert model(**b).logits is None


def test_peft_adapter_on_the_head_after_a_step_trains(lopt_default_mode):
    from peft import LoraConfig, get_peft_model

    b = batch()
    model = lopt_kernels.patch(tiny_model("llama"))
    model(**b).loss.backward()
    model.zero_grad()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    ensure_aux_trainable(peft_model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        out = peft_model(**b)
    head = peft_model.base_model.model.lm_head
    logits = head(peft_model.base_model.model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0])
    expected = peft_model.base_model.model.loss_function(logits, b["labels"], logits.shape[-1])
    torch.testing.assert_close(out.task_loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert head.lora_B["default"].weight.grad is not None and head.lora_B["default"].weight.grad.abs().sum() > 0


# -- also: accelerate's mixed-precision prepare wraps forward on the instance ---------------------------------------


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: an earlier test's Accelerator would refuse mixed_precision='bf16'."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_bf16_prepare_keeps_the_fused_task_loss(lopt_default_mode, fresh_accelerator_state):
    from accelerate import Accelerator

    b = batch()
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    lopt_kernels.patch(model)
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    reference = Accelerator(mixed_precision="bf16", cpu=True).prepare(reference)
    assert "forward" in vars(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice that the fused loss is off
        out = model(**b)
    assert out.logits is None  # fused: no logits
    expected = reference(**b)
    # bf16 logits (autocast), fp32 loss: the fused op rounds its per-row losses to bf16
    torch.testing.assert_close(out.task_loss, expected.loss, rtol=1e-3, atol=0)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=2e-2, atol=2e-4)


def test_a_forward_replaced_by_another_implementation_says_the_fused_loss_is_off(lopt_default_mode):
    b = batch()
    model = lopt_kernels.patch(tiny_model("llama"))
    own = type(model).forward

    @functools.wraps(own)  # as TRL's fused-LM-head forward does: __wrapped__ alone proves nothing
    def replacement(*args, **kwargs):  # e.g. a library's own fused forward, which needs the labels
        return own(model, *args, **kwargs)

    model.forward = replacement
    with pytest.warns(UserWarning, match="forward was replaced on the instance"):
        out = model(**b)
    assert out.logits is not None and out.task_loss is not None


@pytest.fixture
def one_rank_process_group():
    import socket  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_patch_after_fsdp2_sharding_is_refused(one_rank_process_group):
    """patch after fully_shard (or accelerator.prepare): the aux decoders it adds would be plain parameters on every
    rank, never reduced, so each rank trained its own (2 gloo ranks: the decoders' gradients differed across ranks,
    silently). Refused, naming the order that works."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model = tiny_model("llama")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with pytest.raises(LoptPatchError, match=r"already sharded by FSDP2.*Patch the model before sharding it"):
        lopt_kernels.patch(model)


def test_ddp_built_before_patch_is_refused(one_rank_process_group):
    """DDP(model) then patch(model): DDP's reducer holds no aux decoder, so their gradients were never averaged and
    each rank trained its own (2 gloo ranks: different decoder gradients, silently). The first training forward
    under that wrapper is refused; patched first, then wrapped, trains."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    model = tiny_model("llama")
    wrapper = DistributedDataParallel(model)
    lopt_kernels.patch(model)
    with pytest.raises(LoptPatchError, match="DistributedDataParallel built before lopt_kernels.patch"):
        wrapper(**batch())
    assert torch.is_grad_enabled()
    ok = lopt_kernels.patch(tiny_model("llama"))
    DistributedDataParallel(ok)(**batch()).loss.backward()
    assert lopt_kernels.aux_decoders(ok)[0].up.weight.grad.abs().max() > 0
