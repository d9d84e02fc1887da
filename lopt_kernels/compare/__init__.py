"""``lopt-kernels compare``: training-step variants side by side: memory, FLOPs, time, losses.

Variants (each one optimiser-free training step, forward + backward):
  e2e            end-to-end, the model's own loss (logits materialised)
  e2e+fce        end-to-end with a fused linear cross-entropy (no logits), called as its users call it: the
                 unpatched backbone, then torch's torch.nn.functional.linear_cross_entropy(h, lm_head.weight,
                 labels, options=torch.nn.LinearCrossEntropyOptions()) on CPU, Liger's
                 LigerFusedLinearCrossEntropyLoss on CUDA (what use_liger_kernel patches in)
  e2e+ckpt       end-to-end with gradient checkpointing, the model's own loss
  e2e+ckpt+fce   both: what a Liger user runs today
  seed           the LoPT reference code: stored activations, one backward, the model's own loss
  seed+ckpt      the same with its gradient checkpointing
  lopt           this library, mode="eager": the bottom blocks learn during the forward (end-to-end
                 compute), fused task loss
  lopt+ckpt      the same with gradient checkpointing
  lopt-af        this library, mode="activation_free": the bottom blocks are rebuilt in the backward
                 (least memory, one more forward of the bottom half)
  lopt-af+ckpt   the same with gradient checkpointing

Without flags it runs the embedded ``tiny`` preset on its own shape: llama3-8b at 1/16 width (same
depth), batch 1 x seq 256, bf16, LoRA r=1 on a frozen base: the memory and FLOP proportions of
``--config llama3-8b --seq 4096 --batch 1 --dtype bf16 --lora 16`` in about a minute on two CPU cores.
"""

from .command import build_parser, compare_main
from .report import LOPT_BASELINES, format_table, summary_lines, verdict, write_plot
from .targets import (
    CONDITIONS,
    FLOP_SLACK,
    MEMORY_SHARE,
    METRIC_NAMES,
    TARGETS,
    TIME_SLACK,
    Setup,
    Target,
    applicable_targets,
    design_counts,
    measurable_targets,
    setup_of,
    target_checks,
    target_lines,
    targets_header,
)
from .variants import (
    DTYPES,
    METRICS,
    PRESETS,
    RUN_DEFAULTS,
    VARIANTS,
    CompareError,
    Variant,
    build_model,
    enable_checkpointing,
    load_config,
    make_step,
    run_defaults,
    run_variant,
    synthetic_batch,
    user_fused_loss,
)

__all__ = [
    "CONDITIONS",
    "DTYPES",
    "FLOP_SLACK",
    "LOPT_BASELINES",
    "MEMORY_SHARE",
    "METRICS",
    "METRIC_NAMES",
    "PRESETS",
    "RUN_DEFAULTS",
    "TARGETS",
    "TIME_SLACK",
    "VARIANTS",
    "CompareError",
    "Setup",
    "Target",
    "Variant",
    "applicable_targets",
    "build_model",
    "build_parser",
    "compare_main",
    "design_counts",
    "enable_checkpointing",
    "format_table",
    "load_config",
    "make_step",
    "measurable_targets",
    "run_defaults",
    "run_variant",
    "setup_of",
    "summary_lines",
    "synthetic_batch",
    "target_checks",
    "target_lines",
    "targets_header",
    "user_fused_loss",
    "verdict",
    "write_plot",
]
