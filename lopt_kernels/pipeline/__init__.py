"""LoPT as a pipeline: one block per rank, activations flow one way.

Block ``b`` never needs anything back from block ``b + 1``: under LoPT it learns from its own
reconstruction loss. So each rank runs its block's forward on a micro-batch, sends the block's output
downstream, runs the block's local backward at once (the eager order, sharing its code) and moves on to
the next micro-batch. No gradient travels upstream, nothing waits for a backward, and each rank keeps one
micro-batch's activations at a time. The last rank runs the final block, the norm, the head and the task
loss.

    torchrun --nproc_per_node 2 train.py       # in train.py:
    stage = PipelineStage.from_pretrained("./my-model")      # this rank's block only
    optimizer = torch.optim.AdamW(stage.parameters_to_train(), lr=1e-5)
    train_pipeline(stage, batches, optimizer, grad_accum=4, max_steps=100)
    stage.save_shard("out/shards"); join_shards("out/shards", "out/final")  # a standard HF checkpoint

Each rank builds its own part only (the model is built on the meta device, the rank's modules are
materialised and read from the checkpoint). Every rank reads the same batches (the data is small next
to the model); rank 0 embeds them, the others only need their shapes and masks.

The step boundary is synchronous: every rank finishes the window's micro-batches, then steps, so the
parameters after N steps equal single-process LoPT (eager) on the same data.
"""

from .checkpoint import join_shards, load_training_state, save_checkpoint
from .loop import WEIGHTINGS, average_gradients, train_pipeline, window_weights
from .placement import modules_before_layers, stage_layer_ranges
from .stage import MessageCount, PipelineStage, StageTimeline

__all__ = ["WEIGHTINGS", "MessageCount", "PipelineStage", "StageTimeline", "average_gradients", "join_shards",
           "load_training_state", "modules_before_layers", "save_checkpoint", "stage_layer_ranges", "train_pipeline",
           "window_weights"]
