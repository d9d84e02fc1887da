import json
import subprocess
import sys

import pytest
import torch

from lopt_kernels.cli import main
from lopt_kernels.compare import (
    CONDITIONS,
    FLOP_SLACK,
    MEMORY_SHARE,
    TARGETS,
    VARIANTS,
    Setup,
    design_counts,
    load_config,
    run_defaults,
    run_variant,
    summary_lines,
    synthetic_batch,
    target_checks,
    target_lines,
)


pytestmark = pytest.mark.explicit_modes  # compare names every variant's mode itself

SMALL_CONFIG = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
}


def test_compare_prints_summary_table_targets_verdict_and_plot(tmp_path, capsys, recwarn):
    pytest.importorskip("matplotlib")
    out_json = tmp_path / "rows.json"
    out_png = tmp_path / "compare.png"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    code = main(["compare", "--config", str(config), "--batch", "2", "--seq", "128", "--lora", "2", "--steps", "1",
                 "--json", str(out_json), "--plot", str(out_png)])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    # the summary, above the table: LoPT vs end-to-end at the same checkpointing, then which to pick
    summary = printed[: printed.index("variant ")]
    assert "LoPT against end-to-end at the same checkpointing" in summary
    assert "without checkpointing (vs e2e+fce): lopt memory" in summary and "compute" in summary and "time" in summary
    assert "with checkpointing (vs e2e+ckpt+fce): lopt+ckpt memory" in summary
    assert "memory the limit: lopt" in summary and "time the limit: lopt" in summary and "of e2e)" in summary
    for column in ("variant", "step peak MiB", "TFLOPs", "step ms", "tokens/s"):
        assert column in printed
    assert "targets that apply to this configuration, LoRA on a frozen base where activations dominate" in printed
    assert "lopt-af+ckpt / seed+ckpt" in printed and "lopt+ckpt / e2e+ckpt+fce" in printed
    assert ("[miss]" in printed) == ("MISSES its target here" in summary)
    assert "verdict: gradient boundary holds" in printed and "task loss equals e2e" in printed
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
    # progress: one line per variant as it finishes (stderr is not a terminal here), and no warnings
    assert captured.err.count("compare [") == len(VARIANTS) and "Warning" not in captured.err
    assert [f"{w.category.__name__}: {w.message}" for w in recwarn] == []
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert list(rows) == list(VARIANTS)
    for name in ("lopt", "lopt+ckpt", "lopt-af", "lopt-af+ckpt"):
        assert rows[name]["bottom_task_grad_max"] == 0.0
    assert rows["lopt-af"]["step_peak_bytes"] < rows["seed"]["step_peak_bytes"]
    assert rows["lopt-af+ckpt"]["step_peak_bytes"] < rows["seed+ckpt"]["step_peak_bytes"]
    assert rows["lopt-af"]["flops"] > rows["e2e+fce"]["flops"]  # the bottom half's recomputation
    # eager: no recomputation (FLOPs are counted, not timed); the held gradients are reported
    assert rows["lopt"]["flops"] <= 1.01 * rows["e2e+fce"]["flops"]
    assert rows["lopt+ckpt"]["flops"] <= 1.01 * rows["e2e+ckpt+fce"]["flops"]
    assert rows["lopt"]["held_bytes"] > 0 and "held_bytes" not in rows["lopt-af"]
    for name in ("seed", "lopt", "lopt-af", "e2e+fce"):
        assert abs(rows[name]["task_loss"] - rows["e2e"]["task_loss"]) < 1e-4


def test_compare_shows_only_the_targets_set_for_the_configuration():
    rows = [{"variant": name, "step_peak_bytes": 100, "flops": 100, "step_s": 1.0} for name in VARIANTS]
    shape = {"layers": 4, "bottom_layers": 2, "bottom_forward_flops": 10, "aux_flops": 0}
    full = Setup(lora=0, trainable_bytes=10**9, boundary_bytes=10**6, **shape)
    lines = "\n".join(target_lines(rows, full))
    assert "FLOPs     lopt / e2e+fce" in lines and "step peak" not in lines and "step time" not in lines
    assert "MISSES" not in "\n".join(summary_lines(rows, full))  # the FLOP targets hold at ratio 1.0
    lora_small_acts = Setup(lora=16, trainable_bytes=2 * 10**6, boundary_bytes=10**6, **shape)
    lines = "\n".join(target_lines(rows, lora_small_acts))
    assert "step time lopt / e2e+fce" in lines and "step peak" not in lines
    lora = Setup(lora=16, trainable_bytes=10**6, boundary_bytes=10**8, **shape)
    assert len(target_lines(rows, lora)) == len(TARGETS)
    assert all(t.when in CONDITIONS for t in TARGETS)
    # every memory target missed (ratio 1.0: nothing saved of the 2 x 25 MB the design saves): the summary says so
    assert "LoPT MISSES its target here: step peak lopt / e2e+fce = 1.000" in "\n".join(summary_lines(rows, lora))
    # a bound the design's arithmetic cannot give here (no shape read) is not checked
    assert target_lines(rows, Setup(lora=16, trainable_bytes=10**6, boundary_bytes=10**8)) == []


def test_compare_targets_are_the_modes_arithmetic():
    """Each bound is what the mode adds to or saves from its baseline, from the model's shape: eager's FLOPs are its
    baseline's plus the aux decoder's forward and backward (A), activation-free's also one more forward of the bottom
    block's layers and of the decoder (F_b + A / 3); a step peak is the baseline's less MEMORY_SHARE of the bottom block's stored activations
    plus what the mode keeps instead (eager: held gradients; activation-free: the block's input). And the counts
    are the ones that run: the counted FLOPs of lopt-af less e2e's are F_b + 4 A / 3 exactly."""
    config = load_config_from_dict(SMALL_CONFIG)
    batch, seq, lora = 2, 32, 2
    counts = design_counts(config, batch=batch, seq=seq, dtype=torch.float32, lora=lora)
    n, h, inter, heads, kv, d = batch * seq, 64, 128, 4, 2, 16
    linears = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, inter), (h, inter), (inter, h)]
    per_layer = sum(2 * n * i * o + 2 * n * (i * lora + lora * o) for i, o in linears) + 4 * batch * heads * seq**2 * d
    assert counts == {"layers": 6, "bottom_layers": 3, "bottom_forward_flops": 3 * per_layer,
                      "aux_flops": 12 * n * h * (h // 4)}

    rows = [run_variant(VARIANTS[name], config, lambda: synthetic_batch(config, batch, seq, 0, torch.device("cpu")),
                        metrics=["flops"], steps=1, device=torch.device("cpu"), dtype=torch.float32, lora=lora,
                        seed=0, fake=False) for name in ("e2e", "e2e+fce", "lopt", "lopt-af")]
    by = {r["variant"]: r for r in rows}
    aux = counts["aux_flops"]
    assert by["lopt-af"]["flops"] - by["e2e"]["flops"] == counts["bottom_forward_flops"] + aux + aux // 3
    assert by["lopt"]["flops"] - by["e2e+fce"]["flops"] == counts["aux_flops"]
    setup = Setup(lora=lora, trainable_bytes=1, boundary_bytes=6 * n * h * 4, **counts)
    bounds = {(t.num, t.den): b for t, _, b in target_checks(rows, setup) if t.metric == "flops"}
    e2e = by["e2e"]["flops"]
    assert bounds[("lopt-af", "e2e")] == pytest.approx((e2e + 3 * per_layer + 4 * aux / 3) / e2e + FLOP_SLACK)

    peaks = {"e2e+fce": 1000, "e2e+ckpt+fce": 100, "e2e+ckpt": 400, "seed+ckpt": 420, "lopt": 1, "lopt+ckpt": 1,
             "lopt-af": 1, "lopt-af+ckpt": 1}
    mem_rows = [{"variant": k, "step_peak_bytes": v, **({"held_bytes": 7} if k.startswith("lopt+") else {})}
                for k, v in peaks.items()]
    c = 10
    setup = Setup(lora=1, trainable_bytes=1, boundary_bytes=6 * c, **counts)  # L = 6, L_b = 3, c = 10
    bounds = {(t.num, t.den): b for t, _, b in target_checks(mem_rows, setup)}
    s = (1000 - 100) / 6 + c  # stored per layer without checkpointing
    assert bounds[("lopt", "e2e+fce")] == pytest.approx((1000 - MEMORY_SHARE * 3 * s) / 1000)
    assert bounds[("lopt-af", "e2e+fce")] == pytest.approx((1000 - MEMORY_SHARE * 3 * s + c) / 1000)
    assert bounds[("lopt+ckpt", "e2e+ckpt+fce")] == pytest.approx((100 - MEMORY_SHARE * 3 * c + 7) / 100)
    # checkpointed activation-free keeps its seed and, while the block is rebuilt, the boundary's task gradient
    assert bounds[("lopt-af+ckpt", "e2e+ckpt+fce")] == pytest.approx((100 - MEMORY_SHARE * 3 * c + 2 * c) / 100)
    assert bounds[("lopt-af+ckpt", "seed+ckpt")] == pytest.approx((420 - MEMORY_SHARE * (3 * c + 300) + 2 * c) / 420)


def load_config_from_dict(data):
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def test_compare_default_is_the_scaled_8b_lora_run():
    defaults = run_defaults("tiny")
    assert defaults == {"batch": 1, "seq": 256, "dtype": "bf16", "lora": 1}
    tiny, big = load_config("tiny"), load_config("llama3-8b")
    assert tiny.num_hidden_layers == big.num_hidden_layers and big.hidden_size == 16 * tiny.hidden_size
    assert big.intermediate_size == 16 * tiny.intermediate_size and big.vocab_size == 16 * tiny.vocab_size
    assert run_defaults("llama3-8b") == {"batch": 2, "seq": 256, "dtype": "fp32", "lora": 0}


def test_compare_fake_estimates_without_allocating(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    out_png = tmp_path / "fake.png"
    code = main(["compare", "--fake", "--config", str(config), "--batch", "1", "--seq", "64", "--lora", "4",
                 "--variants", "e2e,e2e+ckpt,lopt-af+ckpt", "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "fake tensors (estimate)" in printed and "LoRA r=4" in printed
    assert "FLOPs     lopt-af+ckpt / e2e+ckpt" in printed
    assert "with checkpointing (vs e2e+ckpt+fce)" not in printed  # its baseline did not run
    assert "compute (no time under --fake) the limit: lopt-af+ckpt" in printed and "FLOPs" in printed
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--config", "no-such-preset"], "neither a preset"),
        (["compare", "--batch", "0"], "--batch must be >= 1"),
        (["compare", "--fake", "--metrics", "memory,time"], "cannot measure time"),
        (["compare", "--fake", "--steps", "3"], "no meaning with --fake"),
        (["compare", "--variants", "e2e,fast"], "unknown fast"),
        (["compare", "--metrics", "speed"], "unknown speed"),
        (["compare", "--lora", "-1"], "--lora must be >= 0"),
    ],
)
def test_compare_bad_input(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_compare_unreadable_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["compare", "--config", str(bad)]) == 2
    assert "not a valid transformers config.json" in capsys.readouterr().err


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "lopt_kernels.cli", "compare", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--config" in result.stdout and "lopt+ckpt" in result.stdout


def test_compare_fused_variants_fall_back_where_no_fused_loss_honours_the_soft_cap():
    """``e2e+fce`` on a soft-capped model (Gemma2, the ``gemma2-2b`` preset) on CPU: torch's fused op has no soft
    cap, and the variant raised ValueError, ending the whole compare run; it now runs the model's own loss, saying
    so once, as ``patch`` does."""
    import torch

    from lopt_kernels.compare import VARIANTS, make_step
    from tiny_models import batch, tiny_model

    model = tiny_model("gemma2")
    b = batch()
    with pytest.warns(UserWarning, match="e2e\\+fce runs the model's own loss.*soft-capping"):
        step = make_step(model, VARIANTS["e2e+fce"], b)
    loss, _, _ = step()
    model.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**b, use_cache=False).loss)


def test_compare_fused_end_to_end_is_the_users_call(monkeypatch):
    """``e2e+fce`` is the end-to-end step users run: the unpatched backbone, then on CPU torch's
    ``F.linear_cross_entropy(h, lm_head.weight, labels, options=LinearCrossEntropyOptions())`` with its default
    (mean) reduction. It ran the library's own wrapper, which asks torch for a "sum" (fp32) or per-row "none"
    (bf16) reduction and divides itself: a different, in bf16 slower, baseline than the one users time."""
    import torch.nn.functional as F

    from lopt_kernels.compare import make_step
    from tiny_models import batch, tiny_model

    calls = []
    original = F.linear_cross_entropy

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "linear_cross_entropy", recording)
    model = tiny_model("llama")
    b = batch()
    loss, _, _ = make_step(model, VARIANTS["e2e+fce"], b)()
    assert len(calls) == 1 and "reduction" not in calls[0]
    assert isinstance(calls[0]["options"], torch.nn.LinearCrossEntropyOptions)
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**b, use_cache=False).loss)
