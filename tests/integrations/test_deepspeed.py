"""DeepSpeed ZeRO-1/2/3 (HF Trainer + lopt_kernels.attach, torchrun, 2 processes, gloo, CPU accelerator) equals one
process without DeepSpeed on the same global batch after 2 optimiser steps (accumulation 2), in every mode, for a
full fine-tune and for LoRA, with and without gradient checkpointing. One launch runs every case."""

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


@pytest.mark.slow
@pytest.mark.explicit_modes
def test_zero_stages_equal_one_process(tmp_path):
    import deepspeed_train

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", os.path.join(HERE, "deepspeed_train.py"),
           str(tmp_path)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "LOPT_TEST_DEFAULT_MODE": "auto",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    references, initial = {}, {}
    for name in deepspeed_train.CASES:
        err = tmp_path / f"{name}.err"
        assert not err.exists(), err.read_text()[:3000]
        lora = name.endswith("-lora")
        if lora not in references:
            initial[lora] = {}
            references[lora] = deepspeed_train.run(str(tmp_path), "zero0-stored" + ("-lora" if lora else ""),
                                                   deepspeed=False, initial=initial[lora])
        single, init = references[lora], initial[lora]
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
        for part in ("layers.0.", "layers.4.", "lopt_aux_decoders.0."):
            moved = [n for n in got if part in n and not torch.equal(got[n], init[n])]
            assert moved, f"{name}: nothing in {part} trained"
