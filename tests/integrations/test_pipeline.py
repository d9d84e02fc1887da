"""The LoPT pipeline (lopt_kernels.pipeline, torchrun, gloo) equals single-process LoPT on the same data after
a few optimiser steps, for 2 and 3 stages, with and without gradient checkpointing; no message goes upstream;
no rank materialises the whole model."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import lopt_kernels
from lopt_kernels.discovery import find_layer_stack
from lopt_kernels.integrations import save_aux_decoders

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.slow, pytest.mark.explicit_modes]
STEPS, GA = 4, 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(path, k, lora=False, family="llama", aux_mask="all", **config):
    from tiny_models import tiny_model

    model = tiny_model(family, **config)
    model.save_pretrained(path)
    if lora:  # the pipeline trains this adapter (saved as PEFT saves it)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
        model.save_pretrained(path / "adapter")
    lopt_kernels.patch(model, num_blocks=k, mode="eager", aux_mask=aux_mask)
    save_aux_decoders(model, str(path))  # the pipeline starts its decoders from these
    return model


def _single_process(model, steps, ga, packed=False, weighting="tokens", token_types=False):
    """Single-process LoPT over the same micro-batches, ``ga`` per optimiser step: "tokens", as HF Trainer runs
    it (``num_items_in_batch``: the window's label-token count); "mean", as the LoPT reference (``loss / ga``)."""
    import pipeline_train

    from lopt_kernels.task_loss_hooks import label_count

    optimizer = torch.optim.SGD(model.parameters(), lr=pipeline_train.LR)
    data = pipeline_train.micro_batches(packed, token_types)
    for _ in range(steps):
        window = [next(data) for _ in range(ga)]
        num_items = int(sum(label_count(b) for b in window))
        for b in window:
            # no cache, as the stages run: with one, transformers skips its packed-sequence mask for position ids
            if weighting == "tokens":
                model(**b, use_cache=False, num_items_in_batch=num_items).loss.backward()
            else:
                (model(**b, use_cache=False).loss / ga).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _launch(k, model_dir, out, ckpt, steps=STEPS):
    ckpt = ckpt if isinstance(ckpt, str) else ("1" if ckpt else "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "--nnodes=1",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", os.path.join(HERE, "pipeline_train.py"),
           str(model_dir), str(out), str(steps), str(GA), ckpt]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("k, ckpt", [(2, False), (2, True), (3, False), (3, True), (3, "oldcall"), (2, "dp"), (3, "lora"),
                                     (2, "fp16"), (2, "gemma2"), (2, "packed"), (2, "mean"), (3, "aux_tokens"),
                                     (3, "token_types")],
                         ids=["2-no_ckpt", "2-ckpt", "3-no_ckpt", "3-ckpt", "3-ckpt-old_call", "2x2_data_parallel", "3-lora",
                              "2-fp16", "2-gemma2_5_layers", "2-packed", "2-mean_weighting", "3-aux_mask_tokens",
                              "3-gpt2_token_type_ids"])
def test_pipeline_equals_single_process_lopt(tmp_path, k, ckpt):
    """k stages (k processes); "dp": 2 pipeline replicas x 2 stages on 4 processes against one process on
    the global batch (both replicas' micro-batches in each step). "gemma2": 5 layers alternating sliding and full
    attention, so stage 1 starts at an odd layer (before, its layers took the layer types of the stage's own
    positions: sliding and full swapped); "packed": padding-free packed rows (before, the stages dropped the
    position ids). Micro-batches are weighted by their label tokens (HF Trainer's num_items_in_batch), except
    "mean" (each micro-batch's mean loss / GA, the LoPT reference's); "aux_tokens": aux_mask="tokens".
    "token_types": tied GPT-2 with token_type_ids, which it embeds with its input embeddings before the layers
    (before, the later ranks ran that embedding on their unmaterialised copy and crashed: "Tensor on device meta is
    not on the expected device cpu!")."""
    config = ({"family": "gemma2", "num_hidden_layers": 5} if ckpt == "gemma2"
              else {"family": "gpt2"} if ckpt == "token_types" else {})
    model = _model_dir(tmp_path / "model", k, lora=ckpt == "lora", aux_mask="tokens" if ckpt == "aux_tokens" else "all",
                       **config)
    if ckpt == "fp16":  # the pipeline's fp16 path (eager's power-of-two-scaled local backward), against fp16 LoPT
        model = model.half()
    _launch(4 if ckpt == "dp" else k, tmp_path / "model", tmp_path, ckpt)
    expected = _single_process(model, STEPS, GA * 2 if ckpt == "dp" else GA, packed=ckpt == "packed",
                               weighting="mean" if ckpt == "mean" else "tokens", token_types=ckpt == "token_types")
    if ckpt == "lora":
        return _check_lora(tmp_path, expected, k)

    tolerance = {"rtol": 2e-3, "atol": 1e-3} if ckpt == "fp16" else {"rtol": 1e-5, "atol": 1e-6}
    _assert_pipeline_matches(tmp_path / "shards", tmp_path / "final", expected, tolerance, f"k={k} ckpt={ckpt}")

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(k)]
    for r, rec in enumerate(records):
        m = rec["messages"]
        assert m["upstream_sends"] == 0 and m["downstream_receives"] == 0, m  # nothing travels upstream
        per_step = STEPS * (GA + 1)  # one activation per micro-batch, one aux-loss record per step
        assert m["downstream_sends"] == (per_step if r < k - 1 else 0), m
        assert m["upstream_receives"] == (per_step if r > 0 else 0), m
        assert rec["materialised"] < rec["total"], "a rank built the whole model"
    last = records[-1]["history"]
    assert len(last) == STEPS and all(len(h["aux_loss"]) == k - 1 and min(h["aux_loss"]) > 0 for h in last)


def _assert_pipeline_matches(shards, final, expected, tolerance, label):
    """The joined shards (a standard HF checkpoint) and the shards' aux decoders equal ``expected``'s parameters."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lopt_kernels.pipeline import join_shards
    from lopt_kernels.pipeline.placement import causal_lm_class

    joined = causal_lm_class(AutoConfig.from_pretrained(str(shards))).from_pretrained(join_shards(str(shards), str(final)))
    got = joined.state_dict()
    # every name of a tensor the model ties to another (BERT's decoder bias), as the joined model's state dict lists it
    want = {n: p for n, p in expected.named_parameters(remove_duplicate=False) if not n.startswith("lopt_aux_decoders.")}
    # and the persistent buffers (a router's balancing biases): the stages save them as they are
    want.update((n, b) for n, b in expected.state_dict().items() if n not in want and not n.startswith("lopt_aux"))
    assert set(got) == set(want), set(got) ^ set(want)
    worst = max((got[n] - p).abs().max().item() for n, p in want.items())
    print(f"pipeline {label}: max |param - single process| = {worst:.3e}")
    for n, p in want.items():
        torch.testing.assert_close(got[n].to(p.dtype), p.detach(), **tolerance, msg=f"{label}: {n}")
    decoders = {}
    for f in shards.iterdir():
        if f.suffix == ".safetensors":
            decoders.update((k_, v) for k_, v in load_file(str(f)).items() if k_.startswith("lopt_aux_decoders."))
    want_dec = {n: p for n, p in expected.named_parameters() if n.startswith("lopt_aux_decoders.")}
    assert set(decoders) == set(want_dec)
    for n, p in want_dec.items():
        torch.testing.assert_close(decoders[n], p.detach(), **tolerance, msg=f"{label}: {n}")


def _moe_config(**extra):
    import transformers as tf

    return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, vocab_size=97, hidden_size=40,
                            intermediate_size=72, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def _tiny(name):
    """The model of one ``FAMILY_CASES`` entry, seeded."""
    import transformers as tf

    from tiny_models import tiny_model

    common = dict(vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "mixtral": lambda: _moe_config(),
        # learned positions and a narrower embedding projected in and out (OPT-350m's shape), an embedding LayerNorm
        # (BLOOM), a RoPE/NoPE choice per layer read by the backbone's loop position (GraniteSWA's layer_rope_theta)
        "opt": lambda: tf.OPTConfig(hidden_size=40, ffn_dim=72, num_hidden_layers=4, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.0,
                                    attention_dropout=0.0, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=40, n_layer=4, n_head=4, **common),
        "granite_swa": lambda: tf.GraniteSWAConfig(
            hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, sliding_window=4, layer_types=["full_attention"] * 5,
            layer_rope_theta=[10000.0, 0, 10000.0, 0, 10000.0], **common),
        # mamba and attention layers, each given its mask by the config's layers_block_type: a property (computed from
        # attn_layer_indices), not a stored list; a z-loss on the logits, so the last stage runs the model's own loss
        "bamba": lambda: tf.BambaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, attn_layer_indices=[1, 3],
                                        mamba_n_heads=4, mamba_d_head=20, mamba_d_state=8, mamba_n_groups=1,
                                        mamba_chunk_size=4, mamba_expand=2, z_loss_coefficient=0.1, **common),
        # residual scales kept directly on the decoder layer module (input_residual, post_attention_residual)
        "doge": lambda: tf.DogeConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, **common),
        # scales its inputs_embeds in place (inputs_embeds *= sqrt(d)); tied head with a bias
        "ctrl": lambda: tf.CTRLConfig(n_embd=40, n_layer=4, n_head=4, dff=72, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, **common),
        # BERT as a decoder (BertLMHeadModel): its head's decoder bias is tied to the prediction head's bias, which
        # the checkpoint stores once (cls.predictions.bias)
        "bert_decoder": lambda: tf.BertConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=4,
                                              num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0, is_decoder=True, **common),
        # layers return router states beside the hidden states, which the backbone hands to the next layer's call by
        # position; an fp32 residual stream; a scale and shift kept directly on the backbone, applied before the layers
        "zaya": lambda: tf.ZayaConfig(hidden_size=40, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=10, max_position_embeddings=64, moe_intermediate_size=24, num_experts=4,
                                      num_experts_per_tok=1, router_hidden_size=16, **common),
        # several residual streams per position (batch, positions, 4, hidden); an indexer's top-k selection handed
        # to the next layer's call by keyword, layers 2-4 reusing the one before theirs
        "hy_v4": lambda: tf.HYV4Config(
            hidden_size=40, intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=4, head_dim=8, max_position_embeddings=64, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=10, mlp_layer_types=["dense"] + ["sparse"] * 4, index_topk=4, index_head_dim=8, index_n_heads=2,
            indexer_types=["full", "full", "shared", "shared", "shared"], **common),
        # zips the config's layer_types with its layers (strict)
        "ergo": lambda: tf.ErgoConfig(
            hidden_size=40, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
            first_dense_intermediate_size=72, num_dense_blocks=1, moe_intermediate_size=24,
            shared_intermediate_size=24, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            sliding_window=4, global_attention_every_n_layers=3, **common),
        # layers return (hidden states, state, attentions); no SDPA attention
        "rwkv": lambda: tf.RwkvConfig(hidden_size=40, num_hidden_layers=4, attention_hidden_size=40,
                                      intermediate_size=72, context_length=64, **common),
        # skips its cross-attention layer 3 without images: at 2 stages the last stage's first layer; a
        # MllamaTextConfig, which AutoModelForCausalLM does not map (the checkpoint names MllamaForCausalLM)
        "mllama": lambda: tf.MllamaTextConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=5,
                                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[3],
                                              max_position_embeddings=64, **common),
        # a parameter read before the layers without calling its module (ngram_embeddings.weight, added to the
        # predicting streams); the wrapper and the decoder each hold an Embedding sharing the input embedding's weight
        "prophetnet": lambda: tf.ProphetNetConfig(
            hidden_size=40, decoder_ffn_dim=72, encoder_ffn_dim=72, num_decoder_layers=4, num_encoder_layers=4,
            num_decoder_attention_heads=4, num_encoder_attention_heads=4, max_position_embeddings=64, ngram=2,
            num_buckets=8, relative_max_distance=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            is_decoder=True, add_cross_attention=False, is_encoder_decoder=False, **common),
        # checkpoint keys renamed on load ('.norm.' -> '.kv_norm.', which from_pretrained does not apply to the
        # model's own 'model.norm.weight') and experts stored one tensor each
        "deepseek_v4": lambda: tf.DeepseekV4Config(
            hidden_size=40, moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=10, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
            max_position_embeddings=64, sliding_window=4, o_groups=2, o_lora_rank=16, index_n_heads=2,
            index_head_dim=8, index_topk=4, layer_types=["heavily_compressed_attention", "compressed_sparse_attention"] * 2,
            mlp_layer_types=["hash_moe", "moe", "moe", "moe"], hc_mult=2, **common),
        # one checkpoint tensor split into four model tensors on load (linear_attn.in_proj -> in_proj_qkv, _z, _b, _a)
        "lara_mini": lambda: tf.LaraMiniConfig(
            hidden_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
            max_position_embeddings=64, linear_key_head_dim=10, linear_value_head_dim=10, linear_num_key_heads=2,
            linear_num_value_heads=4, moe_intermediate_size=24, shared_expert_intermediate_size=24,
            num_experts_per_tok=2, num_experts=4, sliding_window=4,
            layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"], **common),
    }
    if name in configs:
        torch.manual_seed(0)
        attn = "eager" if name in ("granite_swa", "bloom") else None
        config = configs[name]()
        if name == "mllama":
            return tf.MllamaForCausalLM._from_config(config, attn_implementation=attn).train()
        return tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn).train()
    family, config = FAMILY_CASES[name]
    return tiny_model(family, **config)


# Every family the patch parity tests cover: name -> (tiny_models family, config overrides).
FAMILY_CASES = {
    "gemma2": ("gemma2", {}), "gpt2_tied": ("gpt2", {}), "gpt2_untied": ("gpt2", {"tie_word_embeddings": False}),
    "gpt_neox": ("gpt_neox", {}), "llama": ("llama", {}), "mistral": ("mistral", {}), "mixtral": (None, {}),
    "phi3": ("phi3", {}), "qwen2_tied": ("qwen2", {}), "qwen3": ("qwen3", {}),
    "opt": (None, {}), "bloom": (None, {}), "granite_swa": (None, {}), "bamba": (None, {}),
    "doge": (None, {}), "ctrl": (None, {}), "bert_decoder": (None, {}),
    "zaya": (None, {}), "hy_v4": (None, {}), "ergo": (None, {}), "rwkv": (None, {}), "mllama": (None, {}),
    "prophetnet": (None, {}), "deepseek_v4": (None, {}), "lara_mini": (None, {}),
}
# at 3 stages patch refuses Mllama's boundaries (a non-final block ending at its skipped layer 3)
TWO_STAGES_ONLY = {"mllama"}


@pytest.mark.parametrize("k", [2, 3])
def test_every_family_trains_in_the_pipeline_as_in_one_process(tmp_path, k):
    """3 steps of 2 padded, token-weighted micro-batches, k stages, every family in one launch: the parameters and
    decoders equal single-process LoPT. GPT-2's learned positions (transformer.wpe) run on rank 0 and are trained
    there (before, the last rank owned them and never stepped them); tied GPT-2 starts its untied head from
    transformer.wte (before, the last rank raised 'has no tensor lm_head.weight'); GraniteSWA's later stages take
    their own layers' RoPE/NoPE setting (before, the stage's positions', 1e-3 off); so do Bamba's, whose per-layer
    block types are a config property (before, not sliced: at k=3 the last stage's attention layer took layer 0's
    mamba mask and crashed on a padded batch; on an unpadded one that mask is None, which eager attention reads as
    no causal mask). Doge keeps parameters directly on its decoder layer module (before, the placement probe counted
    the first layer, which had just started, among the modules running around the layers, and refused Doge). CTRL
    scales its inputs_embeds in place (before, the later stages' broadcast placeholder raised 'more than one element
    of the written-to tensor refers to a single memory location'). BertLMHeadModel ties its decoder bias to another
    tensor that the checkpoint stores (before, the last rank refused it: 'has no tensor cls.predictions.decoder.bias
    (not a checkpoint of this model)'). ZAYA's and HYV4's layers hand state to the next layer's call, ZAYA keeps
    parameters directly on its backbone (before: both refused); HYV4's stages send several residual streams per
    position; Ergo zips its layer_types with the layers (before: rank 1 crashed); RWKV has no SDPA (before: refused
    by transformers, the stages defaulting to it). Mllama skips the last stage's first layer (its cross-attention
    layer, without images): the stage starts at the first of its layers that runs (before, no MllamaTextConfig model
    could be built, and a stage whose first layer was skipped would have run from the placeholder input).
    ProphetNet reads ngram_embeddings.weight before the layers without calling the module (before, the last rank owned
    it and rank 0 never stepped it: 6e-2 off) and shares its input embedding between two Embedding modules (before,
    the last rank saved its untrained copy); DeepSeek-V4's and Lara's checkpoints are renamed and split on load as
    from_pretrained does (before, both refused: 'has no tensor model.norm.weight', '... in_proj_z.weight')."""
    steps, expected = 3, {}
    for name in (n for n in FAMILY_CASES if k == 2 or n not in TWO_STAGES_ONLY):
        model = _tiny(name)
        model.save_pretrained(tmp_path / "models" / name)
        lopt_kernels.patch(model, num_blocks=k, mode="eager")
        save_aux_decoders(model, str(tmp_path / "models" / name))
        expected[name] = model
    _launch(k, tmp_path / "models", tmp_path / "out", "families", steps=steps)
    for name, model in expected.items():
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        _single_process(model, steps, GA)
        _assert_pipeline_matches(tmp_path / "out" / name, tmp_path / "final" / name, model,
                                 {"rtol": 1e-5, "atol": 1e-6}, f"k={k} {name}")
        if name.startswith("gpt2"):  # the learned positions train (their gradient comes from rank 0's block)
            assert not torch.equal(initial["transformer.wpe.weight"], model.transformer.wpe.weight)


def test_the_stages_read_how_the_backbone_calls_its_layers():
    """A stage's backbone iterates every layer (the earlier stages' return their input in their place), so that each
    reads its own index (before, a stage iterated its own layers only: Ergo's strict zip of layer_types with the
    layers crashed on every later stage, and a loop reading `i in config.index_layers` would have taken the stage's
    positions for the model's). The stand-ins return what the loop reads of a layer's output, and the values a
    layer hands to the next layer's call besides its hidden states travel downstream with them (ZAYA's router
    states by position, HYV4's top-k selection by keyword; before, both models were refused)."""
    import transformers as tf

    from lopt_kernels.hf_model import LayerCallSite, layer_call_site

    def site(name):
        with torch.device("meta"):
            lm = _tiny(name) if name in FAMILY_CASES else tf.AutoModelForCausalLM.from_config(
                tf.FalconH1Config(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=10, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                  mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4))
        backbone, attr, _ = find_layer_stack(lm)
        return layer_call_site(type(backbone), attr)

    assert site("llama") == LayerCallSite(outputs=0, carried=())  # hidden_states = decoder_layer(...)
    assert site("bloom") == LayerCallSite(outputs=2, carried=())  # outputs = block(...); hidden_states = outputs[0]
    assert site("rwkv") == LayerCallSite(outputs=3, carried=())  # RWKV's state is the caller's cache, not carried
    assert site("zaya") == LayerCallSite(outputs=2, carried=(("prev_router_hidden_states", 1, 1),))
    assert site("hy_v4") == LayerCallSite(outputs=2, carried=(("topk_indices", 1, "prev_topk_indices"),))
    assert site(None).outputs == 1  # FalconH1: layer_outputs = decoder_layer(...); hidden_states = layer_outputs[0]
    hidden = torch.zeros(2, 3)
    assert LayerCallSite(outputs=0).stand_in_output(hidden) is hidden
    assert LayerCallSite(outputs=3).stand_in_output(hidden) == (hidden, None, None)

    class Unreadable(torch.nn.Module):  # no loop over the stack: the pipeline refuses such a backbone
        def forward(self, hidden_states):
            return hidden_states

    assert layer_call_site(Unreadable, "layers") is None


def test_dropout_draws_from_a_stream_per_rank_and_reproduces(tmp_path):
    """GPT-2 with dropout, every rank seeded alike: each stage draws from its own stream (seeded by the process's
    seed and its rank), so ranks' masks differ (before, both stages' first layers drew identical masks); a rerun
    from the same seed gives the same parameters; the caller's own random state is left as it was. Exact
    equality with single-process LoPT holds without dropout only: one process draws every layer's masks from one
    stream in order, which ranks running side by side cannot reproduce."""
    from safetensors.torch import load_file

    from tiny_models import tiny_model

    model = tiny_model("gpt2", num_hidden_layers=4, resid_pdrop=0.3, attn_pdrop=0.3, embd_pdrop=0.3)
    model.save_pretrained(tmp_path / "model")
    _launch(2, tmp_path / "model", tmp_path, "dropout", steps=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(records[0]["mask"]) == len(records[1]["mask"]) and any(records[0]["mask"])
    assert records[0]["mask"] != records[1]["mask"]
    torch.manual_seed(0)
    assert records[0]["drawn"] == records[1]["drawn"] == torch.rand(3).tolist()
    for shard in sorted((tmp_path / "run0").glob("*.safetensors")):
        first, second = load_file(str(shard)), load_file(str(tmp_path / "run1" / shard.name))
        for n, v in first.items():
            torch.testing.assert_close(second[n], v, rtol=0, atol=0, msg=n)


def test_ranks_on_mixed_dtypes_are_refused_on_every_rank(tmp_path):
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    _launch(2, tmp_path / "model", tmp_path, "mixed-dtypes")
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "disagree on dtype" in err and "torch.bfloat16" in err, err


def test_a_stage_with_nothing_to_train_is_refused_on_every_rank(tmp_path):
    """LoRA on layers 0-2 only, two stages split at layer 3: the last stage (no aux decoder, no adapted module) had
    an empty parameters_to_train(), the caller's optimiser raised on that rank and the other ranks waited forever.
    Now one LoptPatchError on every rank at stage build."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 1, 2])
                   ).save_pretrained(tmp_path / "model" / "adapter")
    _launch(2, tmp_path / "model", tmp_path, "refused-adapter")
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "pipeline rank 1" in errors[0] and "has no trainable tensor" in errors[0], errors


def test_batch_keys_the_stages_would_drop_are_refused(tmp_path):
    """A stage passes input_ids, attention_mask, labels and the per-token inputs to the model, nothing else: a batch
    carrying output_router_logits=True trained without the router loss that patch includes. Refused, naming them."""
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    _launch(2, tmp_path / "model", tmp_path, "refused-batch-keys")
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "batch keys it does not pass to the model: ['output_router_logits']" in err, err


def _drop_tensor(model_dir, name, keep_columns=None):
    """Remove the tensor ``name`` from the checkpoint, or with ``keep_columns`` truncate it to that many columns."""
    from safetensors.torch import load_file, save_file

    path = str(model_dir / "model.safetensors")
    tensors = load_file(path)
    if keep_columns is None:
        del tensors[name]
    else:
        tensors[name] = tensors[name][:, :keep_columns].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _refused_config(case):
    """Tiny configs of models the pipeline must refuse at stage build."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10, max_position_embeddings=64, sliding_window=4, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, layer_types=["sliding_attention", "full_attention"] * 2)
    gemma4 = dict(common, global_head_dim=10, vocab_size_per_layer_input=97)
    return {
        # per-layer inputs (Gemma4's per-layer embeddings, projected from the input embeddings) read by every layer
        "per_layer_inputs": lambda: tf.Gemma4TextConfig(**gemma4, hidden_size_per_layer_input=8),
        # Gemma3n's too (its 4-D AltUp hidden states aside)
        "per_layer_inputs_gemma3n": lambda: tf.Gemma3nTextConfig(
            **common, hidden_size_per_layer_input=8, vocab_size_per_layer_input=97, num_kv_shared_layers=0,
            laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4),
        # layers 2 and 3 reuse layers 0's and 1's keys and values, across the boundary at layer 2
        "kv_sharing": lambda: tf.Gemma4TextConfig(**gemma4, hidden_size_per_layer_input=0, num_kv_shared_layers=2),
        # CPM-Ant's forward takes input_ids only (it prepends prompt tokens and builds its mask from them)
        "no_inputs_embeds": lambda: tf.CpmAntConfig(vocab_size=97, hidden_size=40, num_attention_heads=4,
                                                    dim_head=10, dim_ff=72, num_hidden_layers=4, prompt_length=2,
                                                    position_bias_num_buckets=16, position_bias_max_distance=32),
    }[case]()


@pytest.mark.parametrize("case, match", [
    ("router_loss", "output_router_logits"),
    ("missing_head", "has no tensor lm_head.weight"),
    ("wrong_shape", "model.layers.4.mlp.down_proj.weight"),
    ("per_layer_inputs", "Gemma4ForCausalLM: its decoder layers read trainable tensors computed before the layer stack"),
    ("per_layer_inputs_gemma3n", "Gemma3nForCausalLM: its decoder layers read trainable tensors computed before the "
                                 "layer stack"),
    ("kv_sharing", "layer 2 reuses the keys and values layer 0 computes"),
    ("no_inputs_embeds", "CpmAntForCausalLM's forward takes no inputs_embeds"),
])
def test_a_model_the_stages_cannot_place_is_refused_on_every_rank(tmp_path, case, match):
    """One LoptPatchError on every rank before any compute, naming the rank and the problem: a mixture-of-experts
    router loss (a function of every stage's layers), and a checkpoint missing a tensor only the last rank reads
    (before, that rank raised after the agreement check and rank 0 died on a closed connection), and a tensor of the
    wrong shape, found only while reading (likewise). Per-layer inputs (Gemma4, Gemma3n: trainable tensors computed
    before the layers from the embeddings, read by every stage's layers, so their gradient would travel upstream):
    before, Gemma4's rank 1 raised "Tensor on device meta is not on the expected device cpu!" and Gemma3n's ranks
    "'Gemma3nForCausalLM' object has no attribute 'hidden_size'" (the stage initialised its text model's buffers
    with the causal LM's _init_weights). Keys and values shared across a stage boundary (Gemma4's
    num_kv_shared_layers), which patch refuses for the same blocks: before, the stages trained and rank 1 crashed.
    A forward without inputs_embeds (CPM-Ant): before, refused with "'NoneType' object has no attribute 'dtype'"."""
    import transformers as tf

    from tiny_models import tiny_model

    if case == "router_loss":
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(_moe_config(output_router_logits=True)).save_pretrained(tmp_path / "model")
    elif case in ("per_layer_inputs", "per_layer_inputs_gemma3n", "kv_sharing", "no_inputs_embeds"):
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(_refused_config(case)).save_pretrained(tmp_path / "model")
    elif case == "missing_head":
        tiny_model("llama").save_pretrained(tmp_path / "model")
        _drop_tensor(tmp_path / "model", "lm_head.weight")
    else:  # found only while reading, after the ranks' agreement: a second agreement follows the reads
        tiny_model("llama").save_pretrained(tmp_path / "model")
        _drop_tensor(tmp_path / "model", "model.layers.4.mlp.down_proj.weight", keep_columns=70)
    _launch(2, tmp_path / "model", tmp_path, "refused")
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert errors[0] == errors[1] and match in errors[0], errors
    assert errors[0].startswith(f"pipeline rank {1 if case in ('missing_head', 'wrong_shape') else 0} cannot place the "
                                "model"), errors


@pytest.mark.parametrize("num_layers, world, boundaries, match", [
    (5, 1, None, "at least 2 ranks"),
    (3, 4, None, "fewer than the 4 pipeline stages"),
    (5, 3, (2,), "places 2 stages but the world size is 3"),
    (5, 2, (0,), "boundaries"),  # an empty first stage
    (5, 3, (3, 3), "boundaries"),  # an empty middle stage
])
def test_bad_placements_are_refused(num_layers, world, boundaries, match):
    from lopt_kernels.pipeline import stage_layer_ranges

    with pytest.raises(lopt_kernels.LoptPatchError, match=match):
        stage_layer_ranges(num_layers, world, boundaries)


def test_placement_is_even_or_given():
    from lopt_kernels.pipeline import stage_layer_ranges

    assert stage_layer_ranges(5, 2) == [(0, 3), (3, 5)]  # as patch(num_blocks=2) splits
    assert stage_layer_ranges(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert stage_layer_ranges(6, 3, (1, 4)) == [(0, 1), (1, 4), (4, 6)]


@pytest.mark.parametrize("family", ["llama", "bert_decoder"])
def test_resume_from_a_pipeline_checkpoint_equals_the_straight_run(tmp_path, family):
    """AdamW + an LR schedule: 2 steps, checkpoint (shards + optimiser/scheduler state), a fresh stage from it,
    2 more steps == 4 steps straight; the joined checkpoint of either is a standard HF model. BERT as a decoder ties
    its head's decoder bias to cls.predictions.bias, which the pipeline checkpoint stores under both names (before,
    the resumed stage loaded them into two parameters: the tie was lost)."""
    from safetensors.torch import load_file

    from lopt_kernels.pipeline import join_shards

    if family == "llama":
        _model_dir(tmp_path / "model", 2)
    else:
        model = _tiny(family)
        model.save_pretrained(tmp_path / "model")
        lopt_kernels.patch(model, num_blocks=2, mode="eager")
        save_aux_decoders(model, str(tmp_path / "model"))
    _launch(2, tmp_path / "model", tmp_path, "resume")
    for shard in sorted((tmp_path / "straight").glob("*.safetensors")):
        straight, resumed = load_file(str(shard)), load_file(str(tmp_path / "resumed" / shard.name))
        assert straight.keys() == resumed.keys()
        for n, v in straight.items():
            torch.testing.assert_close(resumed[n], v, rtol=0, atol=0, msg=f"{shard.name}: {n}")
    assert any(k.startswith("lopt_aux_decoders.0.") for k in load_file(str(next((tmp_path / "resumed").glob("*-0-of-2*")))))
    join_shards(str(tmp_path / "resumed"), str(tmp_path / "final"))


def _check_lora(tmp_path, expected, k):
    """The joined output is the trained PEFT adapter; it and the decoders equal the single-process run's."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from lopt_kernels.pipeline import join_shards
    from tiny_models import tiny_model

    out = join_shards(str(tmp_path / "shards"), str(tmp_path / "adapter-out"))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), out)  # a standard adapter directory
    got = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
    want = {n: p for n, p in expected.named_parameters() if ".lora_" in n}
    assert got.keys() == want.keys() and got
    worst = max((got[n] - p).abs().max().item() for n, p in want.items())
    print(f"pipeline k={k} LoRA: max |adapter - single process| = {worst:.3e}")
    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    for n, p in want.items():
        torch.testing.assert_close(got[n].to(p.dtype), p.detach(), **tolerance, msg=n)
    decoders = {}
    for f in (tmp_path / "shards").glob("*.safetensors"):
        decoders.update((n, v) for n, v in load_file(str(f)).items() if n.startswith("lopt_aux_decoders."))
    for n, p in expected.named_parameters():
        if "lopt_aux_decoders." in n:
            key = n[n.index("lopt_aux_decoders."):]
            torch.testing.assert_close(decoders[key], p.detach(), rtol=1e-5, atol=1e-6, msg=key)
    initial = load_file(str(tmp_path / "model" / "adapter" / "adapter_model.safetensors"))
    trained = load_file(str(tmp_path / "adapter-out" / "adapter_model.safetensors"))
    assert initial.keys() == trained.keys()
    for layer in range(5):  # every stage trained its layers' adapters
        assert any(not torch.equal(v, initial[n]) for n, v in trained.items() if f"layers.{layer}." in n), layer


def test_an_adapter_with_modules_to_save_is_refused(tmp_path):
    """The pipeline trains, loads and saves the LoRA matrices only. An adapter with ``modules_to_save`` (a trained
    head, common in SFT) was accepted and its head silently left untrained, unloaded and out of the joined adapter;
    it is now refused before training, naming the fix."""
    from peft import LoraConfig, get_peft_model

    from lopt_kernels.pipeline.checkpoint import inject_adapter
    from tiny_models import tiny_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(lopt_kernels.LoptPatchError, match="modules_to_save"):
        inject_adapter(tiny_model("llama"), str(tmp_path / "adapter"), {}, "cpu")


@pytest.mark.parametrize("case", ["moe_experts", "embeddings"])
def test_lora_adapters_peft_nests_or_keys_by_parameter_train_and_join(tmp_path, case):
    """LoRA adapters the pipeline did not map to PEFT's own keys. "moe_experts": Mixtral's fused expert tensors adapted
    with target_parameters (gate_up_proj and down_proj of one module: PEFT nests two wrappers, whose LoRA tensors are
    experts.base_layer.lora_A and experts.lora_A); before, the shard renamed the inner wrapper's tensors to the outer's,
    so the joined adapter held one of the two (max |adapter - single process| 2.3e-2) and a resumed run
    read the wrong one. "embeddings": the input embeddings and head adapted (PEFT's lora_embedding_A is a parameter,
    saved without the adapter name at the end); before, every rank refused the adapter ("has no LoRA tensor for
    model.embed_tokens.lora_embedding_A.default"). The joined adapter has exactly PEFT's keys and values."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    from lopt_kernels.pipeline import join_shards
    from tiny_models import tiny_model

    if case == "moe_experts":
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(_moe_config()).train()
        lora = dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    else:
        model = tiny_model("llama")
        lora = dict(target_modules=["q_proj", "embed_tokens", "lm_head"])
    model.save_pretrained(tmp_path / "model")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    model.save_pretrained(tmp_path / "model" / "adapter")
    initial = load_file(str(tmp_path / "model" / "adapter" / "adapter_model.safetensors"))
    lopt_kernels.patch(model, num_blocks=2, mode="eager")
    save_aux_decoders(model, str(tmp_path / "model"))
    steps = 2  # SGD at 0.5 blows the adapted embeddings up by the fourth step (to 1e8): 2 steps stay well conditioned
    _launch(2, tmp_path / "model", tmp_path, "lora", steps=steps)
    # PEFT also saves the frozen base weights of adapted embeddings (save_embedding_layers): the LoRA tensors are compared
    expected = {n: p for n, p in get_peft_model_state_dict(_single_process(model, steps, GA)).items() if ".lora_" in n}
    initial = {n: p for n, p in initial.items() if ".lora_" in n}
    got = load_file(str(tmp_path / join_shards(str(tmp_path / "shards"), str(tmp_path / "adapter-out"))
                        / "adapter_model.safetensors"))
    assert got.keys() == expected.keys() == initial.keys(), got.keys() ^ expected.keys()
    worst = max((got[n] - p).abs().max().item() for n, p in expected.items())
    print(f"pipeline LoRA {case}: max |adapter - single process| = {worst:.3e}")
    for n, p in expected.items():
        assert not torch.equal(p, initial[n]), n  # every adapted tensor trained
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
