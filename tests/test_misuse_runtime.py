"""Misuses at run time that used to train wrongly without a word.

Each test is named after the issue's case number. Tests that apply to every boundary mode take the ``mode``
fixture: the conftest's default mode (eager, activation_free) plus ``stored``.
"""

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lopt_kernels
from lopt_kernels.boundary import activation_free
from lopt_kernels.discovery import LoptPatchError
from tiny_models import batch, tiny_model


def _top_and_bottom_names(model):
    bottom = [n for n, p in model.named_parameters() if "layers.0." in n or "layers.1." in n or "layers.2." in n
              or "embed_tokens" in n or "lopt_aux_decoders" in n]
    top = [n for n, _ in model.named_parameters() if n not in bottom]
    return top, bottom


def _cache_of(out):
    return out["cache"] if "cache" in out else out.get("past_key_values")


def _cache_kwarg(model, cache) -> dict:
    """The cache as the model's forward takes it: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect  # noqa: PLC0415

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


# --- eval mode trains end-to-end ------------------------------------------------------------------


def test_eval_mode_grad_forward_warns_once(mode):
    model = tiny_model("llama")
    lopt_kernels.patch(model, mode=mode)
    model.eval()  # what from_pretrained returns
    with pytest.warns(UserWarning, match=r"eval\(\) mode.*model\.train\(\)"):
        model(**batch()).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch()).loss.backward()  # once only


def test_no_warning_under_no_grad_or_in_train_mode(mode):
    model = tiny_model("llama")
    lopt_kernels.patch(model, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()
        with torch.no_grad():
            model(**batch())
        with torch.inference_mode():
            model(**batch())
        model.train()
        model(**batch()).loss.backward()


# --- KV cache in a grad-enabled train-mode forward ------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv_cache_in_training_equals_unpatched(family, mode):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, num_blocks=3, mode=mode, fused_ce="off")
    ids = batch(pad_lengths=(0,), seq=9)["input_ids"]
    out = model(input_ids=ids[:, :6], use_cache=True)
    plain = original(input_ids=ids[:, :6], use_cache=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    cache, plain_cache = _cache_of(out), _cache_of(plain)
    for layer, plain_layer in zip(cache.layers, plain_cache.layers, strict=True):  # every layer honoured it
        torch.testing.assert_close(layer.keys, plain_layer.keys, rtol=0, atol=0)
        torch.testing.assert_close(layer.values, plain_layer.values, rtol=0, atol=0)
    # The step's gradients do not depend on the cache (a replay reads none and writes none).
    (out.logits.float().square().mean() + out.aux_loss).backward()
    for layer, plain_layer in zip(cache.layers, plain_cache.layers, strict=True):
        assert layer.keys.shape == plain_layer.keys.shape
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    again = model(input_ids=ids[:, :6], use_cache=False)
    (again.logits.float().square().mean() + again.aux_loss).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=0, msg=n)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_forward_on_a_prefilled_cache(family, mode):
    """A prompt prefilled without a graph, then a training forward on the continuation: the unpatched model's
    logits (every layer reads the cache), or a clear error where a replay cannot reproduce the cache state."""
    model = tiny_model(family)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, mode=mode, fused_ce="off")
    ids = batch(pad_lengths=(0,), seq=9)["input_ids"]
    with torch.no_grad():
        cache = _cache_of(model(input_ids=ids[:, :6], use_cache=True))
        plain_cache = _cache_of(original(input_ids=ids[:, :6], use_cache=True))
    if mode == "activation_free":
        with pytest.raises(LoptPatchError, match=r"use_cache=False.*mode='eager'"):
            model(input_ids=ids[:, 6:], **_cache_kwarg(model, cache), use_cache=True)
        return
    nxt = model(input_ids=ids[:, 6:], **_cache_kwarg(model, cache), use_cache=True)
    plain_nxt = original(input_ids=ids[:, 6:], **_cache_kwarg(original, plain_cache), use_cache=True)
    torch.testing.assert_close(nxt.logits, plain_nxt.logits, rtol=0, atol=0)
    (nxt.logits.float().square().mean() + nxt.aux_loss).backward()
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_cache_built_by_default_is_complete_or_absent(mode):
    """``config.use_cache`` builds a cache in every training forward the caller did not ask one of: the
    output's cache is the unpatched model's, or None (never one missing the bottom layers)."""
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, mode=mode)
    b = batch()
    cache, plain_cache = _cache_of(model(**b)), _cache_of(original(**b))
    assert plain_cache is not None
    if cache is not None:
        for layer, plain_layer in zip(cache.layers, plain_cache.layers, strict=True):
            torch.testing.assert_close(layer.keys, plain_layer.keys, rtol=0, atol=0)


# --- PEFT target_modules="all-linear" after patch, own loop ----------------------------------------


def test_peft_adapters_in_aux_decoders_refused_at_first_training_forward(mode):
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model = lopt_kernels.patch(tiny_model("llama"), mode=mode)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    assert type(lopt_kernels.aux_decoders(model)[0].down) is not torch.nn.Linear  # the misuse happened
    model.train()
    with pytest.raises(LoptPatchError, match=r"aux decoder.*target_modules"):
        model(**batch())
    model.eval()
    with torch.no_grad():
        model(**batch())  # inference is unaffected


# --- torch.autograd.grad ---------------------------------------------------------------------------


def _pair(mode):
    model = tiny_model("llama")
    stored = copy.deepcopy(model)
    lopt_kernels.patch(model, mode=mode)
    lopt_kernels.patch(stored, mode="stored")
    stored.lopt_aux_decoders.load_state_dict(model.lopt_aux_decoders.state_dict())
    return model, stored


@pytest.mark.parametrize("checkpointing", [False, True])
def test_autograd_grad_equals_stored(lopt_default_mode, checkpointing):
    model, stored = _pair(lopt_default_mode)
    if checkpointing:
        for m in (model, stored):
            m.gradient_checkpointing_enable({"use_reentrant": False})
    b = batch()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(**b).loss, [p for p in model.parameters() if p.requires_grad],
                                allow_unused=True)
    expected = torch.autograd.grad(stored(**b).loss, [p for p in stored.parameters() if p.requires_grad],
                                   allow_unused=True)
    assert all(p.grad is None for p in model.parameters()), "torch.autograd.grad must not write .grad"
    for n, g, e in zip(names, grads, expected, strict=True):
        assert (g is None) == (e is None), n
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=n)


def test_backward_with_inputs_touches_only_those_inputs(lopt_default_mode):
    model, stored = _pair(lopt_default_mode)
    top, _ = _top_and_bottom_names(model)
    wanted = top + [n for n, _ in model.named_parameters() if "layers.0." in n]
    params, stored_params = dict(model.named_parameters()), dict(stored.named_parameters())
    b = batch()
    model(**b).loss.backward(inputs=[params[n] for n in wanted])
    stored(**b).loss.backward(inputs=[stored_params[n] for n in wanted])
    for n, p in params.items():
        if n not in wanted:
            assert p.grad is None, f"{n} is not an input of the backward"
        else:
            torch.testing.assert_close(p.grad, stored_params[n].grad, rtol=1e-5, atol=1e-7, msg=n)


# --- stored mode and a loss without the aux term ---------------------------------------------------


# stored mode did not warn without the aux term: test_patch.py::test_loss_without_the_aux_term_warns_once[stored]


# --- aux_mask="tokens" on a batch without tokens --------------------------------------------------


def test_token_mask_on_a_batch_without_tokens_trains(mode):
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, mode=mode, aux_mask="tokens")
    b = batch()
    b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    b["labels"] = b["input_ids"].clone()
    out = model(**b)
    torch.testing.assert_close(out.task_loss, original(**b).loss, rtol=1e-5, atol=1e-6)
    assert float(out.aux_loss) == 0.0
    out.loss.backward()
    top, bottom = _top_and_bottom_names(model)
    params = dict(model.named_parameters())
    for n in bottom:
        assert params[n].grad is None or params[n].grad.abs().max() == 0, n
    assert params["lm_head.weight"].grad is not None and params["lm_head.weight"].grad.abs().max() > 0
    model(**batch()).loss.backward()  # the next, ordinary batch trains as usual


# --- RNG replay on the block's device -------------------------------------------------------------


def _index(device) -> int:
    return device if isinstance(device, int) else (torch.device(device).index or 0)  # "cuda": the current one (0)


def test_rng_replay_restores_the_captured_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": torch.tensor([_index(device)], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls.append((int(state[0]), _index(device))))
    captured = torch.tensor([42], dtype=torch.uint8)
    call = activation_free.LayerCall(torch.nn.Identity(), (), {}, cpu_rng=torch.get_rng_state(),
                                     device_rng=captured, rng_device=torch.device("cuda", 1))
    tape = activation_free.BlockTape(x=None)
    with activation_free._ReplayContext(tape, call, grad=False):
        assert calls == [(42, 1)], "the captured state is restored on the device it was captured from"
    assert calls[1:] == [(1, 1)], "and that device's own state is put back afterwards"


# --- aux_mask="tokens" host-device syncs ----------------------------------------------------------


class _SyncCounter(TorchDispatchMode):
    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item"}
    GATHERS = {"aten::index_select", "aten::index_copy", "aten::index_copy_", "aten::index.Tensor"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.gathers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.count += 1
        if func._schema.name in self.GATHERS or func.name() in self.GATHERS:
            self.gathers += 1
        return func(*args, **(kwargs or {}))


def _syncs(model, b):
    with _SyncCounter() as counter:
        model(**b).loss.backward()
    return counter.count, counter.gathers


def test_token_mask_costs_no_host_sync_and_no_gather(mode):
    """aux_mask="tokens" hands the fused op a row mask: no nonzero (a host sync) and no gather/scatter of y and
    x (issue 11, item 5). Before, it cost one sync and an index_select of y and x plus an index_copy of grad_y."""
    b = batch()
    b["attention_mask"][0, :3] = 0  # padding, so that the mask excludes rows
    counts = {}
    for aux_mask in ("all", "tokens"):
        model = lopt_kernels.patch(tiny_model("llama"), mode=mode, aux_mask=aux_mask)
        _syncs(model, b)  # first forward: one-time checks
        counts[aux_mask] = _syncs(model, b)
    assert counts["tokens"] == counts["all"], counts


# --- layer stacks that do not run each layer once, in order, on the hidden states alone -------------------------


class _RunOrder(torch.nn.ModuleList):
    """The backbone's loop (``self.layers[: num_hidden_layers]``) runs the layers in ``order``: a recurrent-depth toy
    (Inkling2Loop and Dory loop over part of their stack) or a layer skipped (Mllama's cross-attention layers on text,
    LayerDrop)."""

    order = (0, 1, 2, 3, 4)

    def __getitem__(self, idx):
        if idx == slice(None, 5, None):
            layers = list(self._modules.values())
            return [layers[i] for i in self.order]
        return super().__getitem__(idx)


def _llama_running(order):
    model = tiny_model("llama")
    model.model.layers.__class__ = type("Order", (_RunOrder,), {"order": order})
    return model


def test_a_looped_bottom_layer_is_refused(mode):
    """A layer of a non-final block that runs twice in one forward restarted its block (a KeyError in every mode);
    now a LoptPatchError names the layer and the boundaries that put the loop in the final block, which train."""
    model = _llama_running((0, 1, 2, 1, 2, 3, 4))
    patched = lopt_kernels.patch(copy.deepcopy(model), mode=mode)
    with pytest.raises(LoptPatchError, match=r"layer 1 ran twice in one training forward.*boundaries=\[1\]"):
        patched(**batch(), use_cache=False)
    assert torch.is_grad_enabled()
    ok = lopt_kernels.patch(copy.deepcopy(model), mode=mode, boundaries=[1])
    ok(**batch(), use_cache=False).loss.backward()


def test_a_skipped_block_end_is_refused(mode):
    """A model that skips a layer in its forward (Mllama's cross-attention layers without images, LayerDrop): when it
    is a non-final block's last layer the block never ended, so it had no boundary and no aux term, silently. Now the
    forward raises a LoptPatchError naming the skipped layer; boundaries that avoid it train."""
    model = _llama_running((0, 1, 3, 4))  # layer 2, block 0's last, is skipped
    patched = lopt_kernels.patch(copy.deepcopy(model), mode=mode)
    with pytest.raises(LoptPatchError, match=r"skipped layer\(s\) \[2\].*block 0 = layers 0-2 never ended"):
        patched(**batch(), use_cache=False)
    assert torch.is_grad_enabled()
    ok = lopt_kernels.patch(copy.deepcopy(model), mode=mode, boundaries=[2])  # layer 2 now opens the final block
    ok(**batch(), use_cache=False).loss.backward()
    assert ok.model.layers[1].mlp.down_proj.weight.grad.abs().max() > 0


def test_a_block_reading_earlier_layers_besides_its_hidden_states_is_refused(mode):
    """Inkling2's layers read, besides their hidden states, the stacked inputs of every earlier residual block (its
    block attention residuals): the boundary cut the hidden states only, so the task loss trained the bottom layers
    through that stack (family sweep, 6 layers: stored 25x the reference's gradients, eager "backward through the
    graph a second time", activation-free the embeddings' gradient 60% off). Now refused in every mode, naming the
    layer."""
    import transformers as tf  # noqa: PLC0415

    config = tf.Inkling2TextConfig(
        vocab_size=97, unpadded_vocab_size=97, hidden_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=10, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=10,
        d_rel=8, rel_extent=16, intermediate_size=72, moe_intermediate_size=24, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=1, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).train()
    patched = lopt_kernels.patch(model, mode=mode)
    # at the boundary in every mode; activation-free refuses already inside block 0 (see the next test)
    where = r"layer 1 \(in the non-final block 0" if mode == "activation_free" else r"layer 2, the first of block 1,"
    with pytest.raises(LoptPatchError, match=where + r".*reads besides its hidden states a tensor \(shaped like a stack"):
        patched(**batch(), use_cache=False)
    assert torch.is_grad_enabled()


def test_a_rotary_table_of_the_hidden_states_shape_is_not_a_cross_block_input(mode):
    """A single-head Gemma3 (head_dim == hidden) at batch 1: the full-attention layers' rotary table, first read at
    the boundary layer, has the hidden states' shape (1, seq, hidden). The cross-block check took it for earlier
    layers' states and refused the model in every mode; only a stack of states (one dimension more) or a tensor whose
    graph reaches an earlier block is refused now, and the gradients equal stored mode's."""
    import transformers as tf  # noqa: PLC0415

    from reference import assert_grads_close, named_grads  # noqa: PLC0415

    config = tf.Gemma3TextConfig(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=1,
        num_key_value_heads=1, head_dim=40, max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=40,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    one_row = batch(batch_size=1, pad_lengths=(0,))
    grads = {}
    for m in (mode, "stored"):
        torch.manual_seed(1)  # the same aux decoders
        patched = lopt_kernels.patch(copy.deepcopy(model), mode=m)
        patched(**one_row).loss.backward()
        grads[m] = named_grads(patched)
    assert_grads_close(grads[mode], grads["stored"])


def test_mllama_text_skips_its_cross_attention_layers(mode):
    """MllamaForCausalLM on text skips its cross-attention layers (here layer 3, a second layer class in its stack):
    boundaries that end a block there are refused at the first training forward; others train."""
    import transformers as tf  # noqa: PLC0415

    config = tf.MllamaTextConfig(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 cross_attention_layers=[3], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.MllamaForCausalLM(config).train()
    patched = lopt_kernels.patch(copy.deepcopy(model), mode=mode, num_blocks=3)
    with pytest.raises(LoptPatchError, match=r"skipped layer\(s\) \[3\].*block 1 = layers 2-3 never ended"):
        patched(**batch())
    ok = lopt_kernels.patch(copy.deepcopy(model), mode=mode, boundaries=[1, 3])
    ok(**batch()).loss.backward()
    assert ok.model.layers[2].mlp.down_proj.weight.grad.abs().max() > 0


def _tiny_zaya(layers=4):
    import transformers as tf  # noqa: PLC0415

    config = tf.ZayaConfig(vocab_size=97, hidden_size=40, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=10, max_position_embeddings=64, moe_intermediate_size=24,
                           num_experts=4, num_experts_per_tok=1, router_hidden_size=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("num_blocks, checkpointing", [(2, False), (3, True)])
def test_tensors_a_layer_passes_to_the_next_besides_its_hidden_states_train_in_every_mode(mode, num_blocks,
                                                                                          checkpointing):
    """ZAYA's layers return router states that the next layer reads. Inside a non-final block the activation-free
    rebuild replayed each layer on the recorded router states, a constant, so the bottom routers' aux gradients were
    silently wrong (family sweep: up to 0.8 relative error); then that mode refused them. The rebuild now passes the
    rebuilt router states on, and every mode (mode='auto' included) equals stored; across a boundary they cross with
    their gradient stopped (test_eager.py)."""
    base = _tiny_zaya(layers=6)
    grads = {}
    for m in ("stored", mode, "auto"):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        lopt_kernels.patch(model, mode=m, num_blocks=num_blocks)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model(**batch(), use_cache=False).loss.backward()
        grads[m] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["stored"]["model.layers.0.mlp.gate.router_mlp.fc1.weight"].abs().max() > 0
    for m in (mode, "auto"):
        assert grads[m].keys() == grads["stored"].keys(), m
        for n, g in grads["stored"].items():
            torch.testing.assert_close(grads[m][n], g, rtol=1e-4, atol=1e-7, msg=f"{m}: {n}")


