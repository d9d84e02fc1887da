"""The fused task loss (no logits in training) keeps the model's exact loss semantics."""

import copy
import warnings

import pytest
import torch

import lopt_kernels
from tiny_models import batch, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_training_forward_has_no_logits_and_the_same_loss(family):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    b = batch()
    out = model(**b)
    assert out.logits is None
    assert list(out.keys())[0] == "loss"
    torch.testing.assert_close(out.task_loss, original(**b).loss, rtol=1e-5, atol=1e-6)
    n = torch.tensor(17)
    torch.testing.assert_close(model(**b, num_items_in_batch=n).task_loss, original(**b, num_items_in_batch=n).loss,
                               rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert model(**b).logits is not None  # eval keeps the model's own path


def test_softcapped_family_falls_back_once_with_a_notice_where_the_implementation_cannot_cap():
    model = tiny_model("gemma2")  # final_logit_softcapping: torch's fused op cannot honour it
    original = copy.deepcopy(model)
    lopt_kernels.patch(model, fused_ce="torch")
    b = batch()
    with pytest.warns(UserWarning, match="fused task loss is off.*soft-capping"):
        out = model(**b)
    assert out.logits is not None
    torch.testing.assert_close(out.task_loss, original(**b).loss, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**b)  # said once only


def test_fused_ce_off_keeps_logits():
    model = tiny_model("llama")
    lopt_kernels.patch(model, fused_ce="off")
    assert model(**batch()).logits is not None


_TRANSFORMING = ["FalconH1ForCausalLM", "RecurrentGemmaForCausalLM", "CohereForCausalLM", "GraniteForCausalLM",
                 "InklingForCausalLM", "xLSTMForCausalLM"]
_PLAIN = ["LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "FalconForCausalLM", "Gemma2ForCausalLM",
          "Gemma3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "ModernBertDecoderForCausalLM"]
_HEAD_NAMES = {"ModernBertDecoderForCausalLM": "decoder"}  # its lm_head is a block before the output head


@pytest.mark.explicit_modes
@pytest.mark.parametrize("name", _TRANSFORMING + _PLAIN)
def test_forwards_that_transform_the_head_logits_are_found_from_their_source(name):
    """The fused task loss is exact only where the loss is taken from ``lm_head(hidden)`` (soft-capped by
    ``final_logit_softcapping`` at most): a forward that scales, soft-caps by another name or slices the logits is
    found by reading its source, whatever the config calls the setting (FalconH1's ``lm_head_multiplier``,
    RecurrentGemma's ``logits_soft_cap``, Inkling's vocabulary slice were missed by name)."""
    import transformers

    from lopt_kernels.hf_model import logit_transforms_in_forward

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    found = logit_transforms_in_forward(cls, _HEAD_NAMES.get(name, "lm_head"))
    assert bool(found) == (name in _TRANSFORMING), found


_LOSS_TERMS = ["BambaForCausalLM", "BartForCausalLM", "PegasusForCausalLM", "MarianForCausalLM"]


@pytest.mark.explicit_modes
@pytest.mark.parametrize("name", _LOSS_TERMS + _PLAIN + ["MixtralForCausalLM", "GraniteForCausalLM"])
def test_forwards_that_compute_their_loss_from_the_logits_otherwise_are_found_from_their_source(name):
    """A forward that sets or adds to its loss from the logits other than through ``self.loss_function`` (Bamba's
    z-loss; the Bart family's decoder-only LMs, whose CrossEntropyLoss takes the labels unshifted) is found by reading
    its source; a router loss (Mixtral) or a logit scale (Granite, found by the logit-transform reader) is not one."""
    import transformers

    from lopt_kernels.hf_model import loss_terms_from_logits_in_forward

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    found = loss_terms_from_logits_in_forward(cls, _HEAD_NAMES.get(name, "lm_head"))
    assert bool(found) == (name in _LOSS_TERMS), found


def _loss_term_model(family):
    import transformers as tf

    tokens = dict(vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bamba_z_loss":
        config = tf.BambaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, attn_layer_indices=[1, 3],
                                mamba_n_heads=4, mamba_d_head=20, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4,
                                mamba_expand=2, z_loss_coefficient=0.1, **tokens)
    else:
        config = tf.BartConfig(d_model=40, decoder_layers=4, encoder_layers=4, decoder_attention_heads=4,
                               encoder_attention_heads=4, decoder_ffn_dim=72, encoder_ffn_dim=72,
                               max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                               is_decoder=True, is_encoder_decoder=False, decoder_start_token_id=2,
                               tie_word_embeddings=False, **tokens)  # untied: the head gradients compare
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def _task_loss_and_head_gradient_are_the_models_own(original, mode, b):
    """Patch a copy of ``original`` in ``mode``: its task loss and the task loss's head gradient equal the unpatched
    model's. Returns the patched output and whether the fused loss stepped aside (its one-time notice)."""
    model = copy.deepcopy(original)
    lopt_kernels.patch(model, mode=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**b, use_cache=False)
    ref = original(**b, use_cache=False)
    torch.testing.assert_close(out.task_loss, ref.loss, rtol=1e-5, atol=1e-6)
    (out.task_loss + 0 * out.lopt_aux_loss).backward()
    ref.loss.backward()
    head = model.get_output_embeddings().weight
    torch.testing.assert_close(head.grad, original.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-7)
    return out, any("fused task loss is off" in str(w.message) for w in caught)


@pytest.mark.explicit_modes
@pytest.mark.parametrize("family", ["bamba_z_loss", "bart"])
def test_a_loss_computed_from_the_logits_outside_the_loss_function_is_the_models_own(family):
    """The task loss is the unpatched model's loss: where the forward computes it from the logits other than through
    its loss function, the fused loss steps aside (with a notice) for the model's own. Before, the fused loss left
    Bamba's z-loss out (4.528 against 6.631 with z_loss_coefficient=0.1) and shifted the labels that BartForCausalLM's
    CrossEntropyLoss takes unshifted (4.550 against 4.105); the pipeline's last stage, which chooses its task loss
    the same way, did the same."""
    _, stepped_aside = _task_loss_and_head_gradient_are_the_models_own(_loss_term_model(family), "eager", batch())
    assert stepped_aside


@pytest.mark.explicit_modes
@pytest.mark.parametrize("multiplier", [0.25, 1.0])
def test_falcon_h1_head_multiplier(multiplier):
    """FalconH1 multiplies the head's logits by ``lm_head_multiplier``: with a multiplier the fused loss steps aside
    (with a notice) and the task loss and head gradient are the model's own; a multiplier of 1 keeps it. Before, the
    fused loss ignored the multiplier silently (task loss 4.632 against 4.588)."""
    import transformers as tf

    config = tf.FalconH1Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=1, mamba_chunk_size=8, max_position_embeddings=64,
        lm_head_multiplier=multiplier, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    original = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    out, stepped_aside = _task_loss_and_head_gradient_are_the_models_own(original, "stored", batch(pad_lengths=(0,)))
    assert stepped_aside == (multiplier != 1.0) and (out.logits is None) == (multiplier == 1.0)


def test_auto_runs_the_chunked_loss_off_cuda_and_the_softcapped_family_fuses():
    """Off CUDA ``fused_ce="auto"`` runs the chunked loop, which soft-caps: Gemma2's task loss is fused (no logits,
    no fallback notice) and equals its own loss; before, it fell back to the model's logit-materialising loss."""
    from lopt_kernels.ops.linear_cross_entropy import resolve_implementation

    assert resolve_implementation("auto", torch.device("cpu"), 30.0) == "chunked"
    model = tiny_model("gemma2")
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    b = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(**b)
    assert out.logits is None
    ref = original(**b)
    torch.testing.assert_close(out.task_loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_auto_task_loss_in_bf16_is_the_models_to_fp32_rounding():
    """A bf16 model's fused task loss equals its own loss to fp32 rounding (torch's op, asked for per-row losses,
    was 1e-5 off: it does not round the logits to bf16 as the model's head does)."""
    model = tiny_model("llama").to(torch.bfloat16)
    original = copy.deepcopy(model)
    lopt_kernels.patch(model)
    b = batch()
    torch.testing.assert_close(model(**b).task_loss, original(**b).loss, rtol=1e-6, atol=0)


def _unshifted_loss_models():
    import transformers as tf

    common = dict(vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return {
        # the decoder half of an encoder-decoder family: CrossEntropyLoss(logits, labels), labels not shifted
        "bart": lambda: tf.BartForCausalLM(tf.BartConfig(
            d_model=40, decoder_layers=4, encoder_layers=4, decoder_attention_heads=4, encoder_attention_heads=4,
            decoder_ffn_dim=72, encoder_ffn_dim=72, max_position_embeddings=64, dropout=0.0, **common)),
        "xlnet": lambda: tf.XLNetLMHeadModel(tf.XLNetConfig(d_model=40, n_layer=4, n_head=4, d_inner=72, dropout=0.0,
                                                            **common)),
    }


@pytest.mark.explicit_modes
@pytest.mark.parametrize("family", ["bart", "xlnet"])
def test_forward_with_its_own_unshifted_loss_keeps_its_loss(family):
    """BartForCausalLM (and the other encoder-decoder families' decoder halves, TrOCR, Whisper...), XLNet, XLM and
    CPM-Ant compute their loss with their own ``CrossEntropyLoss`` on labels that are not shifted, not through
    ``self.loss_function``; the fused loss shifted them, so the task loss (here 4.591 against BART's 4.596, 4.597
    against XLNet's 4.553) and every top-block gradient were wrong, silently. Now the fused loss steps aside with a notice and the model's loss runs."""
    torch.manual_seed(0)
    original = _unshifted_loss_models()[family]().train()
    model = copy.deepcopy(original)
    lopt_kernels.patch(model, mode="stored")
    b = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**b)
    ref = original(**b)
    torch.testing.assert_close(out.task_loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert any("fused task loss is off" in str(w.message) and "not self.loss_function" in str(w.message)
               for w in caught)
    (out.task_loss + 0 * out.lopt_aux_loss).backward()
    ref.loss.backward()
    head, ref_head = model.get_output_embeddings().weight, original.get_output_embeddings().weight
    torch.testing.assert_close(head.grad, ref_head.grad, rtol=1e-4, atol=1e-7)
