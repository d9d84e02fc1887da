"""DeepSpeed ZeRO-1/2/3 (HF Trainer + lopt_kernels.attach, torchrun, 2 processes, gloo, CPU accelerator) equals one
process without DeepSpeed on the same global batch after 2 optimiser steps (accumulation 2), in every mode, for a
full fine-tune and for LoRA, with and without gradient checkpointing; a model built by deepspeed.zero.Init too.
Under ZeRO-3: TRL's SFTTrainer trains both halves and the decoders, and 2 steps + resume + 2 equal 4 steps.
A pipeline-parallel PipelineModule is refused. One launch runs every case."""

import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

pytest.importorskip("deepspeed", reason="pip install '.[deepspeed]' (see .ci/run)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = [pytest.mark.slow, pytest.mark.explicit_modes]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One torchrun launch of every case (2 processes); the directory of their results."""
    out = tmp_path_factory.mktemp("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", os.path.join(HERE, "deepspeed_train.py"),
           str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "LOPT_TEST_DEFAULT_MODE": "auto",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _result(out, name):
    err = out / f"{name}.err"
    assert not err.exists(), err.read_text()[:3000]
    return torch.load(out / f"{name}.pt")


def test_zero_stages_equal_one_process(launch):
    import deepspeed_train
    from reference import LAYER_PATHS

    tmp_path = launch
    references, initial = {}, {}
    for name in deepspeed_train.CASES:
        err = tmp_path / f"{name}.err"
        assert not err.exists(), err.read_text()[:3000]
        lora, family = "-lora" in name, deepspeed_train.family_of(name)
        key = (lora, family)
        if key not in references:
            initial[key] = {}
            one = "zero0-stored" + ("-lora" if lora else "") + ("" if family == "llama" else f"-{family}")
            references[key] = deepspeed_train.run(str(tmp_path), one, deepspeed=False, initial=initial[key])
        single, init = references[key], initial[key]
        got = torch.load(tmp_path / f"{name}.pt")
        assert got.keys() == single.keys(), name
        worst = max((got[n] - p).abs().max().item() for n, p in single.items())
        print(f"{name}: max |param - single process| = {worst:.3e}")
        for n, p in single.items():
            torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")
        if name.startswith("zero3-") and not lora:  # save_aux_decoders gathers the ZeRO-3 partitions
            from safetensors.torch import load_file

            from lopt_kernels.integrations import AUX_DECODERS_FILE

            saved = load_file(str(tmp_path / f"{name}-decoders" / AUX_DECODERS_FILE))
            for k, v in saved.items():
                torch.testing.assert_close(v, got[f"lopt_aux_decoders.{k}"], rtol=0, atol=0, msg=f"{name}: saved {k}")
        # both halves (block 0's first layer, the final block's last layer) and the aux decoder trained
        layers = LAYER_PATHS.get(family, "model.layers")
        for part in (f"{layers}.0.", f"{layers}.4.", "lopt_aux_decoders.0."):
            moved = [n for n in got if part in n and not torch.equal(got[n], init[n])]
            assert moved, f"{name}: nothing in {part} trained"


def test_sft_trainer_under_zero3_trains_both_halves_and_the_decoders(launch):
    got = _result(launch, "sft-zero3")
    unchanged = [n for n, p in got["before"].items() if torch.equal(p, got["after"][n])]
    assert not unchanged, f"SFTTrainer + ZeRO-3: not trained: {unchanged}"
    assert any(n.startswith("lopt_aux_decoders.") for n in got["before"])
    assert len(got["aux_loss"]) == 2 and all(a is not None and a > 0 for a in got["aux_loss"])


def test_resume_under_zero3_equals_the_straight_run(launch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lopt_kernels.integrations import AUX_DECODERS_FILE

    got = _result(launch, "resume-zero3")
    straight, resumed = got["resume-straight"], got["resume-resumed"]
    worst = max((resumed[n] - p).abs().max().item() for n, p in straight.items())
    print(f"resume-zero3: max |2 + resume + 2 - 4 steps| = {worst:.3e}")
    for n, p in straight.items():
        torch.testing.assert_close(resumed[n], p, rtol=1e-6, atol=1e-7, msg=f"resumed: {n}")
    # each checkpoint holds the decoders whole (gathered from the partitions, one file)
    saved = load_file(str(launch / "resume-straight" / "checkpoint-4" / AUX_DECODERS_FILE))
    assert saved
    for k, v in saved.items():
        torch.testing.assert_close(v, straight[f"lopt_aux_decoders.{k}"], rtol=0, atol=0, msg=f"saved {k}")
    assert (launch / "resume-straight" / "checkpoint-2" / AUX_DECODERS_FILE).is_file()
    # save_model() wrote a standard checkpoint: loads without LoPT, no decoder tensors, the trained weights
    final = AutoModelForCausalLM.from_pretrained(str(launch / "resume-final")).state_dict()
    assert not [k for k in final if "lopt" in k]
    for k, v in final.items():
        if k in straight:
            torch.testing.assert_close(v, straight[k], rtol=0, atol=0, msg=f"save_model: {k}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_built_by_zero_init_equals_one_process(launch, family):
    """GPT-2: a tied head, which patch unties from the partitioned embedding. Before, the untied head was a clone
    of this rank's empty partition (shape (0,)) and ZeRO-3 failed an assertion on it in the first forward."""
    import deepspeed_train

    suffix = "" if family == "llama" else f"-{family}"
    got = _result(launch, f"zero3init-auto{suffix}")
    single = deepspeed_train.run(str(launch), f"zero0-auto{suffix}", deepspeed=False, start=got["initial"])
    worst = max((got["final"][n] - p).abs().max().item() for n, p in single.items())
    print(f"zero3init-auto{suffix}: max |param - single process| = {worst:.3e}")
    for n, p in single.items():
        torch.testing.assert_close(got["final"][n], p, rtol=1e-5, atol=1e-6, msg=f"zero.Init: {n}")


def test_pipeline_module_is_refused(launch):
    err = (launch / "pipeline.err").read_text()
    assert err.startswith("LoptPatchError") and "PipelineModule" in err and "ZeRO" in err, err[:500]


def test_eager_refuses_trainable_zero3_leaf_modules(launch):
    """DeepSpeed flags MoE blocks as ZeRO-3 leaf modules and reduces their gradients from a backward hook on the
    module, which eager's local backward (inside the forward, before the caller's loss weights the aux term) would
    trigger. Before: DeepSpeed's hook raised 'A leaf node was passed to _will_engine_execute_node but we are
    currently running autograd.grad()' in the middle of the Mixtral forward; now a LoptPatchError names the modes
    that train it."""
    err = (launch / "zero3-eager-mixtral.err").read_text()
    assert err.startswith("LoptPatchError") and "MixtralSparseMoeBlock" in err, err[:3000]
    assert "mode='activation_free'" in err and "ZeRO-3 leaf modules" in err, err[:1000]
