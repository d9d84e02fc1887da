"""Misuse and edge cases of the task loss and the output fields.

Each test is named after the case it guards; the patched model must do what the unpatched one does,
or raise/warn (once) with a message that names the problem and the fix."""

import copy

import pytest
import torch

import lopt_kernels
from lopt_kernels.patching import state_of, top_and_bottom_params
from reference import assert_grads_close, named_grads
from tiny_models import batch, tiny_model


def _top_grads(model):
    top, _ = top_and_bottom_params(state_of(model))
    return {n: p.grad for n, p in model.named_parameters() if id(p) in top}


# ----------------------------------------------------------------------------------------------
# a micro-batch whose labels are all -100
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "liger", "chunked"])
@pytest.mark.parametrize("num_items", [None, 0, "tensor0"])
def test_all_labels_ignored_gives_zero_task_gradients_not_nan(impl, num_items):
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, fused_ce=impl)
    ids = batch()["input_ids"]
    labels = torch.full_like(ids, -100)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(0) if num_items == "tensor0" else 0}
    out = model(input_ids=ids, labels=labels, **kw)
    ref = original(input_ids=ids, labels=labels, **kw)
    assert torch.isnan(ref.loss) and torch.isnan(out.task_loss) and torch.isnan(out.loss)  # as unpatched
    out.loss.backward()
    ref.loss.backward()
    ref_grads = dict(original.named_parameters())
    for name, grad in _top_grads(model).items():
        expected = ref_grads[name].grad
        assert grad is not None and torch.equal(grad, expected), name  # zero, exactly as unpatched
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        if num_items is not None and p.grad is not None:
            # no label token in the whole window: the micro-batch's aux weight n_mb / num_items is 0, not NaN
            assert not p.grad.any(), name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# MoE router (load-balancing) loss
# ----------------------------------------------------------------------------------------------

_MOE_COMMON = dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, output_router_logits=True, router_aux_loss_coef=0.5)
MOE_CONFIGS = {
    "mixtral": lambda: __import__("transformers").MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                **_MOE_COMMON),
    "qwen2_moe": lambda: __import__("transformers").Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        **_MOE_COMMON),
    "qwen3_moe": lambda: __import__("transformers").Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=12, **_MOE_COMMON),
}


def _tiny_moe(family):
    import transformers as tf  # noqa: PLC0415

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(MOE_CONFIGS[family](), attn_implementation="sdpa",
                                                dtype=torch.float32)
    return model.train()


@pytest.mark.parametrize("fused_ce", ["auto", "off"])
@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_moe_router_loss_is_kept(family, fused_ce):
    model = _tiny_moe(family)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, fused_ce=fused_ce)
    b = batch()
    ref = original(**b)
    out = model(**b)
    assert ref.aux_loss is not None and ref.aux_loss.requires_grad
    # .aux_loss stays the model's router loss; LoPT's reconstruction loss is in .lopt_aux_loss
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=0)
    assert out.lopt_aux_loss is not None and out.lopt_aux_loss.requires_grad
    assert not torch.equal(out.lopt_aux_loss, out.aux_loss)
    # task_loss is the unpatched loss: CE + router_aux_loss_coef * router loss
    torch.testing.assert_close(out.task_loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss + 10.0 * out.lopt_aux_loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    ref_params = dict(original.named_parameters())
    top = _top_grads(model)
    assert any("gate" in n for n in top)  # the top block's routers are trained by the router term
    for name, grad in top.items():
        expected = ref_params[name].grad
        if expected is None:
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_dense_model_keeps_aux_loss_as_reconstruction_loss():
    out = lopt_kernels.patch(tiny_model("llama"))(**batch())
    assert out.aux_loss is out.lopt_aux_loss
    torch.testing.assert_close(out.loss, out.task_loss + 10.0 * out.lopt_aux_loss)


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["activation_free", "eager", "stored"])
def test_moe_router_term_does_not_train_bottom_blocks(mode):
    model = lopt_kernels.patch(_tiny_moe("mixtral"), mode=mode)
    out = model(**batch())
    bottom_router = model.model.layers[0].mlp.gate.weight
    (grad,) = torch.autograd.grad(out.task_loss, [bottom_router], allow_unused=True)
    assert grad is None or not grad.any()


# ----------------------------------------------------------------------------------------------
# return_dict=False with labels
# ----------------------------------------------------------------------------------------------


def test_return_dict_false_puts_the_loss_first():
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    b = batch()
    as_dict = model(**b)
    # (config.return_dict=False breaks the unpatched model itself in transformers 5: not tested here)
    out, ref = model(**b, return_dict=False), original(**b, return_dict=False)
    assert isinstance(out, tuple)  # (the cache entry is the block hooks' business, not compared here)
    assert out[0].dim() == 0, "the tuple's first element must be the loss"
    torch.testing.assert_close(out[0], as_dict.loss, rtol=1e-5, atol=1e-6)  # task + lambda_aux * aux
    torch.testing.assert_close(out[0], ref[0] + 10.0 * as_dict.lopt_aux_loss, rtol=1e-5, atol=1e-6)
    assert out[1].shape == ref[1].shape  # the logits, where the unpatched tuple has them
    out[0].backward()
    as_dict.loss.backward()  # gradients flow through the tuple's loss as through the dict's


# ----------------------------------------------------------------------------------------------
# labels of the wrong length, logits_to_keep with labels
# ----------------------------------------------------------------------------------------------


def _outcome(fn):
    try:
        out = fn()
    except Exception as error:  # noqa: BLE001 - the same exception as the unpatched model is the requirement
        return type(error), str(error)
    return out


@pytest.mark.parametrize("case", ["short_labels", "long_labels", "logits_to_keep_1", "logits_to_keep_5_sliced_labels",
                                  "logits_to_keep_0"])
@pytest.mark.parametrize("fused_ce", ["auto", "liger"])
def test_wrong_length_labels_and_logits_to_keep_match_the_unpatched_model(case, fused_ce):
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, fused_ce=fused_ce)
    b = batch()
    ids, labels = b["input_ids"], b["labels"]
    kw = {
        "short_labels": dict(labels=labels[:, :-2]),
        "long_labels": dict(labels=torch.cat([labels, labels[:, :3]], dim=1)),
        "logits_to_keep_1": dict(labels=labels, logits_to_keep=1),
        "logits_to_keep_5_sliced_labels": dict(labels=labels[:, -5:], logits_to_keep=5),
        "logits_to_keep_0": dict(labels=labels, logits_to_keep=0),
    }[case]
    ref = _outcome(lambda: original(input_ids=ids, **kw))
    out = _outcome(lambda: model(input_ids=ids, **kw))
    if isinstance(ref, tuple):  # the unpatched model raised: so must the patched one, with the same error
        assert out == ref
        return
    assert not isinstance(out, tuple), out
    assert out.loss is not None
    torch.testing.assert_close(out.task_loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss + 10.0 * out.lopt_aux_loss, rtol=1e-5, atol=1e-6)
    # the model's logits are returned wherever the unpatched model's are not the whole sequence
    if kw.get("logits_to_keep"):
        assert out.logits is not None and out.logits.shape == ref.logits.shape


def test_shift_labels_without_labels_matches_the_unpatched_model():
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    b = batch()
    shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:]
    ref = original(input_ids=b["input_ids"], shift_labels=shift)
    out = model(input_ids=b["input_ids"], shift_labels=shift)
    if ref.loss is None:
        assert out.loss is None
    else:
        torch.testing.assert_close(out.task_loss, ref.loss, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# a second backward (retain_graph=True) through the fused task loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.explicit_modes
@pytest.mark.parametrize("impl", ["torch", "liger", "chunked"])
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_second_backward_through_fused_task_loss_names_the_cause_and_the_setting(mode, impl):
    model = lopt_kernels.patch(tiny_model("llama"), mode=mode, fused_ce=impl)
    out = model(**batch())
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"fused task loss.*fused_ce='off'") as info:
        out.loss.backward()
    if mode == "eager":
        assert "mode='activation_free'" in str(info.value)  # the eager boundary allows one backward too


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["activation_free", "stored"])
def test_second_backward_works_with_fused_ce_off(mode):
    model = lopt_kernels.patch(tiny_model("llama"), mode=mode, fused_ce="off")
    out = model(**batch())
    out.loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in first:
            torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------------------
# attach, then unpatch, then train
# ----------------------------------------------------------------------------------------------


def test_unpatch_after_attach_says_so_and_how_to_fix(tmp_path):
    from transformers import Trainer, TrainingArguments  # noqa: PLC0415

    from lopt_kernels.patching import LoptPatchError  # noqa: PLC0415

    b = batch()
    rows = [{k: v[i] for k, v in b.items()} for i in range(2)]
    model = lopt_kernels.patch(tiny_model("llama"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = lopt_kernels.attach(Trainer(model=model, args=args, train_dataset=rows))
    lopt_kernels.unpatch(model)
    with pytest.raises(LoptPatchError, match=r"unpatched after lopt_kernels\.attach.*lopt_kernels\.patch") as info:
        trainer.train()
    assert "before lopt_kernels.attach" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# no host-device sync in the task-loss/aux-weighting hot path
# ----------------------------------------------------------------------------------------------

_HOT_PATH = ("lopt_kernels/task_loss_hooks.py", "lopt_kernels/ops/linear_cross_entropy.py")


def _caller_in_hot_path() -> str | None:
    import sys  # noqa: PLC0415

    frame = sys._getframe(2)  # the caller of the wrapped method
    name = frame.f_code.co_filename.replace("\\", "/")
    return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame.f_lineno}" if name.endswith(_HOT_PATH) else None


@pytest.mark.parametrize("num_items", ["int", "cpu_tensor"])
def test_aux_weighting_makes_no_blocking_host_device_transfer(num_items, monkeypatch):
    """On CPU there is no device to wait for, so this checks the calls that would block on CUDA: a value read
    back to the host (``.item()``, ``bool``/``int``/``float`` of a tensor) or a copy to a device without
    ``non_blocking`` (``Tensor.to(device)``, ``torch.as_tensor``/``torch.tensor`` of a host value on a device),
    made from the fused task loss and the aux weighting."""
    model = lopt_kernels.patch(tiny_model("llama"))
    b = batch()
    n = 17 if num_items == "int" else torch.tensor(17)
    blocking = []

    def record(kind, original, check=None):
        def wrapper(*args, **kwargs):
            where = _caller_in_hot_path()
            if where is not None and (check is None or check(*args, **kwargs)):
                blocking.append((kind, where))
            return original(*args, **kwargs)

        return wrapper

    def to_without_non_blocking(self, *args, **kwargs):
        moves = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
        return moves and not kwargs.get("non_blocking", False)

    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, record(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "to", record("to", torch.Tensor.to, to_without_non_blocking))
    for name in ("as_tensor", "tensor"):
        monkeypatch.setattr(torch, name, record(name, getattr(torch, name), lambda *a, **k: "device" in k))
    out = model(**b, num_items_in_batch=n)
    monkeypatch.undo()
    assert blocking == []
    # and the weighting is still right: loss = task + lambda * (n_mb / num_items) * aux
    n_mb = (b["labels"][:, 1:] != -100).sum().float()
    torch.testing.assert_close(out.loss, out.task_loss + 10.0 * n_mb / 17 * out.lopt_aux_loss)


@pytest.mark.explicit_modes
def test_eager_local_backward_under_checkpointing_records_no_router_logits_twice():
    """Eager mode's local backward runs inside the forward; under gradient checkpointing it recomputes the bottom
    layers there, and transformers' output capturing (live for the whole backbone forward) recorded their routers'
    logits again: 8 router logits for Mixtral's 5 layers, a router loss off the unpatched one, and the caller's
    backward failed ("backward through the graph a second time") on the extra entries' freed graph. Now the
    recomputation records nothing: the router loss is the unpatched one and the gradients are stored mode's."""
    base = _tiny_moe("mixtral")
    b = batch()
    ref = copy.deepcopy(base)(**b)
    grads = {}
    for mode in ("eager", "stored"):
        model = copy.deepcopy(base)
        model.gradient_checkpointing_enable()
        torch.manual_seed(1)  # the same aux decoders
        lopt_kernels.patch(model, mode=mode)
        out = model(**b, use_cache=False)
        assert len(out.router_logits) == 5
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=0)
        out.loss.backward()
        grads[mode] = named_grads(model)
    assert_grads_close(grads["eager"], grads["stored"])


@pytest.mark.explicit_modes
@pytest.mark.parametrize("mode", ["eager", "activation_free", "stored"])
def test_router_logits_of_fewer_layers_than_the_stack_are_cut_below_the_boundary(mode):
    """Jamba (like DeepSeek / GLM / Ernie-MoE with dense first layers) returns router logits for its MoE layers only:
    2 for 4 layers here. The bottom entries were detached only where there was one per layer, so the router loss
    trained the bottom block (stored: every bottom gradient off, up to 3000x the reference's in the family sweep) or
    the caller's backward failed ("backward through the graph a second time", eager). Now the
    entries whose graph reaches a non-final block are detached: the bottom gradients are those without router
    logits, and the top router still learns from the router loss."""
    import transformers as tf  # noqa: PLC0415

    config = tf.JambaConfig(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=1, mamba_dt_rank=8, use_mamba_kernels=False, router_aux_loss_coef=0.5, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    b = batch()
    grads = {}
    for router_logits in (True, False):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same aux decoders
        lopt_kernels.patch(model, mode=mode)
        out = model(**b, use_cache=False, output_router_logits=router_logits)
        if router_logits:
            assert len(out.router_logits) == 2 and out.aux_loss is not None
        out.loss.backward()
        grads[router_logits] = named_grads(model)
    bottom = [n for n in grads[True] if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))]
    assert "model.layers.1.feed_forward.router.weight" in bottom
    assert_grads_close({n: grads[True][n] for n in bottom}, {n: grads[False][n] for n in bottom})
    top_router = "model.layers.3.feed_forward.router.weight"
    assert not torch.allclose(grads[True][top_router], grads[False][top_router])
