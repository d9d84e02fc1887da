"""examples/sft.py and examples/grpo.py run offline on a tiny saved model + tokenizer and a local jsonl file."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import sft_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




# torch's gloo teardown can abort a process at interpreter exit after a run has finished and written everything
# (pytorch/pytorch#179291: work objects destroyed during finalisation). The examples destroy their process group;
# a launch whose only failure is that abort, after the summary line, finished its run.
TEARDOWN_ABORT = "terminate called without an active exception"


def _finished(proc, summary_marker):
    if proc.returncode == 0:
        return True
    return TEARDOWN_ABORT in proc.stderr and summary_marker in proc.stdout


def _run(script, model_dir, data, out, *extra, launcher=(), env_extra=None):
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "examples", script), "--model", str(model_dir), "--data", str(data),
           "--output_dir", str(out), "--max_steps", "2", "--batch_size", "4", "--grad_accum", "2", "--lr", "1e-3",
           "--local_lr", "2e-3", "--method", "lopt", "--num_blocks", "2", "--lambda_aux", "10", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert _finished(proc, "summary: method=lopt"), proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "summary: method=lopt, steps=2" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["last_aux_loss"] > 0
    assert not (out / "final" / "lopt_aux_decoders.safetensors").exists()
    return summary


@pytest.mark.slow
def test_sft_example(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    _run("sft.py", model_dir, data, tmp_path / "out", "--max_length", "32")


@pytest.mark.slow
def test_grpo_example(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_rows(8)])
    _run("grpo.py", model_dir, data, tmp_path / "out", "--num_generations", "4", "--max_completion_length", "4",
         "--keywords", "one,two,three")


@pytest.mark.slow
def test_sft_example_under_accelerate_deepspeed_zero3(tmp_path, model_dir):
    """The README's ZeRO-3 command (examples/accelerate_zero3.yaml, 2 processes), on DeepSpeed's CPU accelerator
    in fp32 (the config's bf16 is overridden: CPU)."""
    pytest.importorskip("deepspeed")
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    launcher = ("-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "examples", "accelerate_zero3.yaml"),
                "--mixed_precision", "no", "--main_process_port", str(_free_port()))
    summary = _run("sft.py", model_dir, data, tmp_path / "out", "--max_length", "32", launcher=launcher,
                   env_extra={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert summary["processes"] == 2 and summary["distributed"] == "DEEPSPEED"
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "final")).state_dict()
    assert final and not [k for k in final if "lopt" in k]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_example(script, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", os.path.join(ROOT, "examples", script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert _finished(proc, "summary: stages="), proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.explicit_modes
def test_pipeline_sft_example_trains_saves_and_resumes(tmp_path, model_dir):
    """examples/pipeline_sft.py on 2 processes: 4 steps straight (checkpoints every 2) == 2 steps + --resume;
    the final directory is a standard checkpoint."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    common = ["--model", str(model_dir), "--data", str(data), "--max_steps", "4", "--micro_batch", "2",
              "--grad_accum", "2", "--lr", "1e-3", "--max_length", "32", "--save_steps", "2"]
    proc = _torchrun_example("pipeline_sft.py", *common, "--output_dir", str(tmp_path / "straight"))
    assert "summary: stages=2, steps=4" in proc.stdout and "messages_upstream=0" in proc.stdout
    _torchrun_example("pipeline_sft.py", *common, "--output_dir", str(tmp_path / "resumed"),
                      "--resume", str(tmp_path / "straight" / "checkpoint-2"))
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for n, v in straight.items():
        assert torch.equal(v, resumed[n]), n
    before = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "straight" / "final")).state_dict()
    assert any(not torch.equal(final[n], before[n]) for n in final if "layers.0." in n)
    assert any(not torch.equal(final[n], before[n]) for n in final if "layers.3." in n)
