"""Tiny decoder-only models built from configs (no downloads), one per supported family."""

from __future__ import annotations

import functools

import torch
import transformers as tf

VOCAB = 97
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _common(**extra):
    base = dict(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **_TOKENS,
    )
    base.update(extra)
    return base


FAMILIES = {
    "llama": lambda **kw: tf.LlamaConfig(**_common(**kw)),
    "qwen2": lambda **kw: tf.Qwen2Config(**_common(tie_word_embeddings=True, **kw)),
    "qwen3": lambda **kw: tf.Qwen3Config(**_common(head_dim=12, **kw)),
    "mistral": lambda **kw: tf.MistralConfig(**_common(**kw)),
    "gemma2": lambda **kw: tf.Gemma2Config(**_common(head_dim=10, sliding_window=4, query_pre_attn_scalar=10, **kw)),
    "gemma3": lambda **kw: tf.Gemma3TextConfig(**_common(head_dim=10, sliding_window=4, query_pre_attn_scalar=10, **kw)),
    "phi3": lambda **kw: tf.Phi3Config(**_common(**kw)),
    "gpt2": lambda **kw: tf.GPT2Config(**{
        **dict(vocab_size=VOCAB, n_embd=40, n_layer=kw.pop("num_hidden_layers", 5), n_head=4, n_positions=64,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_TOKENS),
        **kw,
    }),
    "gpt_neox": lambda **kw: tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=kw.pop("num_hidden_layers", 5),
        num_attention_heads=4, max_position_embeddings=64, **_TOKENS, **kw,
    ),
}


# Mixture-of-experts families, router load-balancing loss on (kept apart from FAMILIES, whose tests assume dense
# layers).
MOE_FAMILIES = {
    "mixtral": lambda **kw: tf.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2,
                                                       output_router_logits=True, router_aux_loss_coef=0.5, **kw)),
    # router logits for its MoE layers only (every second one), Mamba and attention layers in one stack
    "jamba": lambda **kw: tf.JambaConfig(**_common(**{
        "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2, "expert_layer_period": 2,
        "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_d_state": 8,
        "mamba_d_conv": 4, "mamba_expand": 1, "mamba_dt_rank": 8, "use_mamba_kernels": False,
        "output_router_logits": True, "router_aux_loss_coef": 0.5, **kw})),
}


# Families whose transformers implementation has no sdpa path.
EAGER_ONLY = {"gemma2"}


def tiny_model(family: str, *, seed: int = 0, attn: str = "sdpa", dtype=torch.float32, **config_overrides):
    """A freshly initialised tiny causal LM of ``family`` in train mode."""
    config = {**FAMILIES, **MOE_FAMILIES}[family](**config_overrides)
    if family in EAGER_ONLY:
        attn = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.train()
    return model


def batch(*, batch_size=2, seq=11, seed=1, padding="right", pad_lengths=(0, 3)):
    """input_ids, attention_mask and labels (-100 on padding and on a prompt prefix)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    labels = ids.clone()
    for row in range(batch_size):
        pad = pad_lengths[row % len(pad_lengths)]
        if pad:
            if padding == "right":
                mask[row, seq - pad :] = 0
            else:
                mask[row, :pad] = 0
        labels[row][mask[row] == 0] = -100
    labels[0, :2] = -100  # a prompt prefix that is not trained on
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def with_old_checkpoint_call(layers) -> None:
    """Give ``layers`` transformers < 5.23's gradient checkpointing, which checkpoints a layer's whole ``__call__``
    (module hooks included: ``checkpoint(partial(super().__call__, **kwargs), *args)``); newer versions checkpoint
    ``forward`` only. A no-op on a transformers that already does the old thing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if "__call__" in vars(GradientCheckpointingLayer):
        return
    base = type(layers[0])

    class OldCheckpointCallLayer(base):
        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                kwargs["use_cache"] = False
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)

    # newer transformers wrap every subclass's forward in their checkpointing; the old ones did not
    OldCheckpointCallLayer.forward = getattr(base.forward, "__wrapped__", base.forward)
    for layer in layers:
        layer.__class__ = OldCheckpointCallLayer
