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
from lopt_kernels.integrations import save_aux_decoders

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.slow, pytest.mark.explicit_modes]
STEPS, GA = 4, 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(path, k, lora=False, family="llama", **config):
    from tiny_models import tiny_model

    model = tiny_model(family, **config)
    model.save_pretrained(path)
    if lora:  # the pipeline trains this adapter (saved as PEFT saves it)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
        model.save_pretrained(path / "adapter")
    lopt_kernels.patch(model, num_blocks=k, mode="eager")
    save_aux_decoders(model, str(path))  # the pipeline starts its decoders from these
    return model


def _single_process(model, steps, ga, packed=False):
    """Single-process LoPT over the same micro-batches (``ga`` per optimiser step, a mean over them)."""
    import pipeline_train

    optimizer = torch.optim.SGD(model.parameters(), lr=pipeline_train.LR)
    data = pipeline_train.micro_batches(packed)
    for _ in range(steps):
        for _ in range(ga):
            # no cache, as the stages run: with one, transformers skips its packed-sequence mask for position ids
            (model(**next(data), use_cache=False).loss / ga).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _launch(k, model_dir, out, ckpt):
    ckpt = ckpt if isinstance(ckpt, str) else ("1" if ckpt else "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "--nnodes=1",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", os.path.join(HERE, "pipeline_train.py"),
           str(model_dir), str(out), str(STEPS), str(GA), ckpt]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("k, ckpt", [(2, False), (2, True), (3, False), (3, True), (3, "oldcall"), (2, "dp"), (3, "lora"),
                                     (2, "fp16"), (2, "gemma2"), (2, "packed")],
                         ids=["2-no_ckpt", "2-ckpt", "3-no_ckpt", "3-ckpt", "3-ckpt-old_call", "2x2_data_parallel", "3-lora",
                              "2-fp16", "2-gemma2_5_layers", "2-packed"])
def test_pipeline_equals_single_process_lopt(tmp_path, k, ckpt):
    """k stages (k processes); "dp": 2 pipeline replicas x 2 stages on 4 processes against one process on
    the global batch (both replicas' micro-batches in each step). "gemma2": 5 layers alternating sliding and full
    attention, so stage 1 starts at an odd layer (before, its layers took the layer types of the stage's own
    positions: sliding and full swapped); "packed": padding-free packed rows (before, the stages dropped the
    position ids)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lopt_kernels.pipeline import join_shards

    config = {"family": "gemma2", "num_hidden_layers": 5} if ckpt == "gemma2" else {}
    model = _model_dir(tmp_path / "model", k, lora=ckpt == "lora", **config)
    if ckpt == "fp16":  # the pipeline's fp16 path (eager's power-of-two-scaled local backward), against fp16 LoPT
        model = model.half()
    _launch(4 if ckpt == "dp" else k, tmp_path / "model", tmp_path, ckpt)
    expected = _single_process(model, STEPS, GA * 2 if ckpt == "dp" else GA, packed=ckpt == "packed")
    if ckpt == "lora":
        return _check_lora(tmp_path, expected, k)

    joined = AutoModelForCausalLM.from_pretrained(join_shards(str(tmp_path / "shards"), str(tmp_path / "final")))
    got = joined.state_dict()
    want = {n: p for n, p in expected.named_parameters() if not n.startswith("lopt_aux_decoders.")}
    assert set(got) == set(want), set(got) ^ set(want)
    worst = max((got[n] - p).abs().max().item() for n, p in want.items())
    print(f"pipeline k={k} ckpt={ckpt}: max |param - single process| = {worst:.3e}")
    tolerance = {"rtol": 2e-3, "atol": 1e-3} if ckpt == "fp16" else {"rtol": 1e-5, "atol": 1e-6}
    for n, p in want.items():
        torch.testing.assert_close(got[n].to(p.dtype), p.detach(), **tolerance, msg=n)
    decoders = {}
    for f in (tmp_path / "shards").iterdir():
        if f.suffix == ".safetensors":
            decoders.update((k_, v) for k_, v in load_file(str(f)).items() if k_.startswith("lopt_aux_decoders."))
    want_dec = {n: p for n, p in expected.named_parameters() if n.startswith("lopt_aux_decoders.")}
    assert set(decoders) == set(want_dec)
    for n, p in want_dec.items():
        torch.testing.assert_close(decoders[n], p.detach(), **tolerance, msg=n)

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


def test_ranks_on_mixed_dtypes_are_refused_on_every_rank(tmp_path):
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    _launch(2, tmp_path / "model", tmp_path, "mixed-dtypes")
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "disagree on dtype" in err and "torch.bfloat16" in err, err


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


def test_resume_from_a_pipeline_checkpoint_equals_the_straight_run(tmp_path):
    """AdamW + an LR schedule: 2 steps, checkpoint (shards + optimiser/scheduler state), a fresh stage from it,
    2 more steps == 4 steps straight; the joined checkpoint of either is a standard HF model."""
    from safetensors.torch import load_file

    from lopt_kernels.pipeline import join_shards

    _model_dir(tmp_path / "model", 2)
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

    from lopt_kernels.pipeline.checkpoint import _inject_adapter
    from tiny_models import tiny_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(lopt_kernels.LoptPatchError, match="modules_to_save"):
        _inject_adapter(tiny_model("llama"), str(tmp_path / "adapter"), {}, "cpu")
