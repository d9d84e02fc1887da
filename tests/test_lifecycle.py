"""unpatch, save/load, param_groups and bad-input errors."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import lopt_kernels
from lopt_kernels import LoptPatchError
from tiny_models import batch, tiny_model


def _logits(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_unpatch_restores_structure_and_forward(family):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    names_before = [n for n, _ in model.named_parameters()]
    tied_before = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    lopt_kernels.patch(model)
    assert lopt_kernels.is_patched(model)
    patched_names = {n for n, _ in model.named_parameters() if not n.startswith("lopt_aux_decoders.")}
    assert set(names_before) <= patched_names
    # untying makes the output embedding a parameter of its own, under its usual name
    assert patched_names - set(names_before) == ({"lm_head.weight"} if tied_before else set())
    lopt_kernels.unpatch(model)
    assert not lopt_kernels.is_patched(model)
    assert not hasattr(model, "lopt_aux_decoders")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    if tied_before:  # untying stays
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert model.config.tie_word_embeddings is False
    b = batch()
    torch.testing.assert_close(_logits(model, b), _logits(original, b), rtol=0, atol=0)
    # the unpatched model trains end to end again: the bottom half gets task gradient
    model(**b).loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().max() > 0


def test_parameter_names_and_backbone_state_dict_unchanged():
    model = tiny_model("llama")
    backbone_keys = list(model.model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    lopt_kernels.patch(model)
    assert list(model.model.state_dict()) == backbone_keys
    patched = [n for n, _ in model.named_parameters()]
    assert patched[: len(names)] == names
    aux_names = patched[len(names) :]
    assert aux_names and all(n.startswith("lopt_aux_decoders.") for n in aux_names)
    decs = lopt_kernels.aux_decoders(model)
    assert len(decs) == 1
    assert isinstance(decs[0].norm, torch.nn.LayerNorm)
    assert isinstance(decs[0].down, torch.nn.Linear) and decs[0].down.out_features == 10
    assert isinstance(decs[0].up, torch.nn.Linear)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for d in decs for p in d.parameters())


def test_decoder_initialisation():
    model = tiny_model("llama", hidden_size=64, intermediate_size=96)
    lopt_kernels.patch(model)
    dec = lopt_kernels.aux_decoders(model)[0]
    bound = 0.1 * math.sqrt(6.0 / (64 + 16))
    assert dec.down.weight.shape == (16, 64) and dec.up.weight.shape == (64, 16)
    for lin in (dec.down, dec.up):
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > bound * 0.5
        assert torch.all(lin.bias == 0)
    assert torch.all(dec.norm.weight == 1) and torch.all(dec.norm.bias == 0)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2", "llama"])
def test_save_pretrained_is_a_standard_checkpoint(family, tmp_path):
    model = tiny_model(family)
    lopt_kernels.patch(model)
    # one update so that lm_head and the embeddings really differ after untying
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**batch()).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                        attn_implementation=model.config._attn_implementation)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    loaded.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded, b), _logits(model, b), rtol=0, atol=0)


def test_param_groups_split_top_and_local():
    model = tiny_model("gpt2")
    lopt_kernels.patch(model)
    groups = lopt_kernels.param_groups(model, lr=1e-3, local_lr=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lopt_top"]["lr"] == 1e-3 and by_name["lopt_local"]["lr"] == 5e-4
    top = {id(p) for p in by_name["lopt_top"]["params"]}
    local = {id(p) for p in by_name["lopt_local"]["params"]}
    assert not top & local
    assert top | local == {id(p) for p in model.parameters()}
    tr = model.transformer
    assert {id(p) for p in tr.h[3].parameters()} | {id(p) for p in tr.ln_f.parameters()} | {id(model.lm_head.weight)} <= top
    assert {id(p) for p in tr.h[0].parameters()} | {id(tr.wte.weight), id(tr.wpe.weight)} <= local
    assert {id(p) for p in model.lopt_aux_decoders.parameters()} <= local
    decayed = lopt_kernels.param_groups(model, lr=1e-3, weight_decay=0.1)
    assert {g["name"] for g in decayed} == {"lopt_top", "lopt_top_no_decay", "lopt_local", "lopt_local_no_decay"}
    assert all(p.dim() < 2 for g in decayed if g["name"].endswith("no_decay") for p in g["params"])
    torch.optim.AdamW(groups)  # accepted as is


@pytest.mark.parametrize("word_embed_proj_dim", [40, 24])
def test_param_groups_follow_the_forward_not_the_registration_order(word_embed_proj_dim):
    # OPT registers its final LayerNorm and project_out (both applied after the layers, trained by the task loss)
    # before its layer stack: param_groups put them at local_lr with the embeddings
    import transformers as tf

    config = tf.OPTConfig(vocab_size=97, hidden_size=40, ffn_dim=72, num_hidden_layers=4, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=word_embed_proj_dim, dropout=0.0,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = lopt_kernels.patch(tf.AutoModelForCausalLM.from_config(config))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in lopt_kernels.param_groups(model, lr=1.0, local_lr=0.1)}
    dec = model.model.decoder
    after = [dec.final_layer_norm, *([dec.project_out] if dec.project_out is not None else [])]
    before = [dec.embed_tokens, dec.embed_positions, *([dec.project_in] if dec.project_in is not None else [])]
    assert {id(p) for m in after for p in m.parameters()} | {id(model.lm_head.weight)} <= groups["lopt_top"]
    assert {id(p) for m in before for p in m.parameters()} <= groups["lopt_local"]
    # and they really are trained that way: the task loss reaches the final norm, only the aux loss the embeddings
    out = model(**batch())
    out.task_loss.backward(retain_graph=True)
    assert dec.final_layer_norm.weight.grad.abs().max() > 0 and dec.embed_positions.weight.grad is None


# ---------------------------------------------------------------------------- bad input


def _still_works_unpatched(model):
    assert not lopt_kernels.is_patched(model)
    assert not hasattr(model, "lopt_aux_decoders")
    b = batch()
    model(**b).loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_blocks": 1}, "num_blocks must be between 2"),
        ({"num_blocks": 6}, "num_blocks must be between 2"),
        ({"boundaries": [3, 2]}, "strictly increasing"),
        ({"boundaries": [0, 2]}, "must lie in"),
        ({"boundaries": [2, 5]}, "must lie in"),
        ({"boundaries": [2], "num_blocks": 3}, "contradicts"),
        ({"lambda_aux": -1.0}, "lambda_aux"),
        ({"lambda_aux": float("nan")}, "lambda_aux"),
        ({"mode": "lazy"}, "mode must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_options_leave_model_untouched(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(LoptPatchError, match=match):
        lopt_kernels.patch(model, **kwargs)
    _still_works_unpatched(model)


def test_not_a_causal_lm():
    model = tiny_model("llama")
    with pytest.raises(LoptPatchError, match="causal LM.*Supported"):
        lopt_kernels.patch(model.model)
    with pytest.raises(LoptPatchError, match="causal LM"):
        lopt_kernels.patch(torch.nn.Linear(3, 3))
    _still_works_unpatched(model)


def test_no_recognisable_layer_stack():
    model = tiny_model("llama")
    model.config.num_hidden_layers = 9  # no stack of 9 layers exists
    with pytest.raises(LoptPatchError, match="no nn.ModuleList of 9.*Supported"):
        lopt_kernels.patch(model)
    model.config.num_hidden_layers = 5
    _still_works_unpatched(model)


def test_patching_twice():
    model = tiny_model("llama")
    lopt_kernels.patch(model)
    assert lopt_kernels.patch(model) is model  # same settings: a no-op
    assert len(lopt_kernels.aux_decoders(model)) == 1
    with pytest.raises(LoptPatchError, match="already patched.*unpatch"):
        lopt_kernels.patch(model, num_blocks=3)
    assert len(lopt_kernels.aux_decoders(model)) == 1
    lopt_kernels.unpatch(model)
    _still_works_unpatched(model)


def test_unpatch_unpatched_model():
    model = tiny_model("llama")
    with pytest.raises(LoptPatchError, match="not patched"):
        lopt_kernels.unpatch(model)
    with pytest.raises(LoptPatchError, match="not patched"):
        lopt_kernels.aux_decoders(model)
    _still_works_unpatched(model)


def test_lopt_kernels_integrations_is_reachable_as_an_attribute():
    """README: ``lopt_kernels.integrations.ensure_aux_trainable(model)`` after a plain ``import lopt_kernels``
    (a fresh process: nothing has imported the submodule yet); before, an AttributeError."""
    import subprocess
    import sys

    code = ("import lopt_kernels, sys; assert 'lopt_kernels.integrations' not in sys.modules; "
            "print(lopt_kernels.integrations.ensure_aux_trainable.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ensure_aux_trainable" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_resize_token_embeddings_after_patch(family):
    """``resize_token_embeddings`` after ``patch`` (special tokens added later) puts a new output-head module in
    place: training with the fused task loss still works and equals the model's own loss (``fused_ce="off"``),
    gradients included. Before, every training forward with labels raised (no output-head input found)."""
    base = tiny_model(family)
    models = {}
    for fused_ce in ("auto", "off"):
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # the same aux decoders and new rows in both
        lopt_kernels.patch(model, fused_ce=fused_ce)
        model.resize_token_embeddings(base.config.vocab_size + 7, mean_resizing=False)
        model.train()
        out = model(**batch())
        out.loss.backward()
        models[fused_ce] = (model, out)
    (fused, fused_out), (own, own_out) = models["auto"], models["off"]
    assert fused_out.logits is None  # the fused loss ran
    torch.testing.assert_close(fused_out.loss, own_out.loss, rtol=1e-5, atol=1e-6)
    own_grads = dict(own.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, own_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fused.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("fused_ce", ["auto", "off"])
def test_a_deep_copy_of_a_patched_model_trains_itself(fused_ce):
    """``copy.deepcopy`` of a patched model (a copy per run of a sweep, an EMA or teacher copy): the copy's hooks act
    on the copy, which trains as a model patched afresh with the same weights does, and the original is untouched.
    Before, the hooks were closures over the original's state: the copy's fused loss used the original's head, its
    gradients went to the original's head and decoders, and in eager mode its bottom block got none."""
    base = tiny_model("llama")
    torch.manual_seed(0)
    model = lopt_kernels.patch(copy.deepcopy(base), fused_ce=fused_ce)
    twin = copy.deepcopy(model)
    torch.manual_seed(0)  # the same aux decoders
    fresh = lopt_kernels.patch(copy.deepcopy(base), fused_ce=fused_ce)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # the original diverges: neither the copy's loss nor its gradients may see it
    for m in (twin, fresh):
        m.train()
        m(**batch()).loss.backward()
    assert all(p.grad is None for p in model.parameters()), "the copy's backward reached the original"
    fresh_params = dict(fresh.named_parameters())
    for name, p in twin.named_parameters():
        assert (p.grad is None) == (fresh_params[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, fresh_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    lopt_kernels.unpatch(twin)  # the copy's own hooks and decoders go; the original stays patched and trains
    assert lopt_kernels.is_patched(model) and not lopt_kernels.is_patched(twin)
    model.train()
    model(**batch()).loss.backward()
    assert all(p.grad is not None for p in lopt_kernels.aux_decoders(model)[0].parameters())


@pytest.mark.explicit_modes
def test_deep_copies_after_a_step_and_of_one_hooked_module():
    """A deep copy taken after a training step (PEFT prefix tuning: eager blocks note the prefix tensors, which
    belong to that step's graph) works, and pickling a patched model that has run a forward too; a hooked
    submodule copied on its own (PEFT's modules_to_save copies the head) shares the model's state instead of
    carrying a hidden copy of the whole model."""
    import io

    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    lopt_kernels.patch(model, mode="auto")  # eager blocks: the prefix tensors are noted as outside inputs
    model.train()
    model(**batch()).loss.backward()
    twin = copy.deepcopy(model)  # before: "Only Tensors created explicitly by the user ... support the deepcopy protocol"
    twin.train()
    twin(**batch()).loss.backward()
    torch.save(model, io.BytesIO())  # before: a local closure (and a weak reference) could not be pickled

    plain = lopt_kernels.patch(tiny_model("llama"), mode="auto")
    layer = copy.deepcopy(plain.model.layers[0])
    hooks = [h for h in layer._forward_pre_hooks.values() if hasattr(h, "state")]
    assert hooks and all(h.state is lopt_kernels.patching.state_of(plain) for h in hooks)
