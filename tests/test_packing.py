"""aux_mask and padding-free packed batches (CPU, sdpa and eager)."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

import lopt_kernels
from tiny_models import tiny_model

SEQUENCES = [[5, 9, 14, 3, 7, 22, 8], [11, 4, 6], [30, 2, 19, 17, 25]]


def _padded():
    width = max(map(len, SEQUENCES))
    ids = torch.zeros(len(SEQUENCES), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(SEQUENCES):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed():
    collate = DataCollatorWithFlattening(return_tensors="pt")
    return collate([{"input_ids": s, "labels": list(s)} for s in SEQUENCES])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_equals_unpacked_with_token_mask(family, attn):
    model = tiny_model(family, attn=attn)
    lopt_kernels.patch(model, aux_mask="tokens")
    packed = _packed()
    assert "position_ids" in packed and "attention_mask" not in packed
    # transformers only detects packed sequences when no KV cache is built (use_cache=False)
    out_packed = model(**packed, use_cache=False)
    out_padded = model(**_padded(), use_cache=False)
    torch.testing.assert_close(out_packed.task_loss, out_padded.task_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_packed.aux_loss, out_padded.aux_loss, rtol=1e-5, atol=1e-9)
    # and the gradients agree as well
    g_packed = torch.autograd.grad(out_packed.loss, list(model.parameters()), allow_unused=True)
    g_padded = torch.autograd.grad(out_padded.loss, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_packed, g_padded):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_aux_mask_all_counts_padding_like_the_reference():
    model = tiny_model("llama")
    tokens_only = tiny_model("llama")
    lopt_kernels.patch(model, aux_mask="all")
    lopt_kernels.patch(tokens_only, aux_mask="tokens")
    lopt_kernels.aux_decoders(tokens_only)[0].load_state_dict(lopt_kernels.aux_decoders(model)[0].state_dict())
    padded = _padded()
    captured = {}
    layers = model.model.layers
    h1 = layers[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    h2 = layers[2].register_forward_hook(lambda m, a, o: captured.__setitem__("y", o))
    aux_all = model(**padded).aux_loss
    h1.remove()
    h2.remove()
    dec = lopt_kernels.aux_decoders(model)[0]
    err = (dec(captured["y"]).float() - captured["x"].float()) ** 2
    torch.testing.assert_close(aux_all, err.mean(), rtol=1e-5, atol=1e-9)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(tokens_only(**padded).aux_loss, err[real].mean(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["activation_free", "stored"])
def test_token_mask_gradients_match_between_modes(mode):
    free = tiny_model("llama")
    other = tiny_model("llama")
    lopt_kernels.patch(free, aux_mask="tokens")
    lopt_kernels.patch(other, aux_mask="tokens", mode=mode)
    lopt_kernels.aux_decoders(other)[0].load_state_dict(lopt_kernels.aux_decoders(free)[0].state_dict())
    padded = _padded()
    free(**padded).loss.backward()
    other(**padded).loss.backward()
    for (n, a), (_, b) in zip(free.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8, msg=n)
