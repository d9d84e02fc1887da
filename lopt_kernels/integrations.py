"""LoPT inside the trainers people already use: ``lopt_kernels.attach(trainer)``.

``patch(model)`` alone is enough for any loop that backpropagates the patched model's own ``.loss``
(``task + lambda_aux * aux``): the boundary takes the local loss's scale from the gradient that reaches
the aux term. Trainers that build their own loss from the logits or log-probs (TRL's ``SFTTrainer``
with its fused LM head, ``GRPOTrainer``, a ``compute_loss_func``, label smoothing) never read
``.loss``, so nothing would train the blocks below the last boundary. ``attach(trainer)`` closes that
gap without subclassing anything:

* it wraps the trainer instance's ``compute_loss``: after the trainer's own loss is built, every
  training forward of the micro-batch whose aux term does not appear in that loss's autograd graph
  gets ``lambda_aux * w * aux`` added, with ``w`` the weight the trainer gives a per-micro-batch mean
  (``n_mb / num_items_in_batch`` when the trainer normalises by the window's label count, ``1/GA`` when
  it divides its own loss by the accumulation steps, 1 when ``Trainer.training_step`` divides after
  ``compute_loss``). Everything after ``compute_loss`` (accumulation division, a GradScaler, DDP
  averaging) then applies to the aux term exactly as to the task loss;
* it inserts a :class:`LoptCallback` first in the callback list that adds ``task_loss`` and
  ``aux_loss`` to every training log (``trainer.state.log_history`` and the reporting integrations),
  writes the aux decoders to ``lopt_aux_decoders.safetensors`` in each checkpoint directory (the model
  weights there stay a standard ``save_pretrained`` checkpoint) and loads them back when
  ``trainer.train(resume_from_checkpoint=...)`` resumes; their optimiser state is part of the
  Trainer's ``optimizer.pt`` already;
* it makes the aux decoders trainable again if ``get_peft_model`` froze them (``patch`` before
  ``get_peft_model``) and checks that they are in the optimiser when training starts.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from .aux_decoder import AUX_DECODERS_FILE
from .block_hooks import ADAPTED_DECODER_MESSAGE
from .boundary.common import gathered
from .discovery import unwrap_causal_lm
from .optimizer_watch import optimizer_param_ids
from .patching import LoptPatchError, state_of
from .task_loss_hooks import item_share, label_count

_ATTACHED_ATTR = "_lopt_callback"

__all__ = ["AUX_DECODERS_FILE", "LoptCallback", "attach", "ensure_aux_trainable", "load_aux_decoders",
           "save_aux_decoders"]


def _require_patched(model, *, attached: bool = False):
    state = state_of(model)
    if state is None:
        if attached:
            raise LoptPatchError(
                f"{type(model).__name__} was unpatched after lopt_kernels.attach(trainer) (lopt_kernels.unpatch), so "
                "the trainer would train it without LoPT. To train with LoPT, call lopt_kernels.patch(model) again "
                "(same settings) before trainer.train(); to train end-to-end, build a new trainer without attach."
            )
        raise LoptPatchError(
            f"{type(model).__name__} is not patched: call lopt_kernels.patch(model) before lopt_kernels.attach(trainer)"
        )
    return state


def ensure_aux_trainable(model: nn.Module) -> list[torch.Tensor]:
    """Set ``requires_grad`` on every aux decoder parameter and return them.

    ``peft.get_peft_model`` freezes every parameter that is not an adapter, the aux decoders included,
    when it runs after ``patch``. Call this (``attach`` does) before the optimiser is built."""
    state = _require_patched(model)
    for module in state.decoders.modules():
        if module is not state.decoders and hasattr(module, "base_layer"):
            raise LoptPatchError(ADAPTED_DECODER_MESSAGE)
    params = list(state.decoders.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def _plain(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # FSDP2 / DTensor: gather the shards (a collective on every rank)
    # a copy: a ZeRO-3 parameter's gathered storage is freed when it is partitioned again
    return (full() if callable(full) else t).detach().to("cpu", copy=True).contiguous()


def save_aux_decoders(model: nn.Module, directory: str, *, write: bool = True) -> str:
    """Write the aux decoders' weights to ``directory/lopt_aux_decoders.safetensors`` and return the path.
    Under FSDP2 every rank must call it (the shards are gathered); pass ``write`` only on one rank."""
    from safetensors.torch import save_file  # noqa: PLC0415

    state = _require_patched(model)
    with gathered(state.decoders.parameters()):  # DeepSpeed ZeRO-3: whole tensors, not this rank's partition
        tensors = {k: _plain(v) for k, v in state.decoders.state_dict().items()}
    path = os.path.join(directory, AUX_DECODERS_FILE)
    if write:
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, path, metadata={"format": "pt", "lopt_boundaries": repr(state.settings.boundaries)})
    return path


def load_aux_decoders(model: nn.Module, directory: str) -> None:
    """Load ``directory/lopt_aux_decoders.safetensors`` into the aux decoders, in place (the parameter
    objects, and so the optimiser's references to them, stay the same)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    state = _require_patched(model)
    path = os.path.join(directory, AUX_DECODERS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: the checkpoint was not written by a trainer with lopt_kernels.attach, so the "
            "aux decoders cannot be restored (resuming would restart them from their initialisation)."
        )
    loaded = load_file(path)
    with gathered(state.decoders.parameters(), modifier_rank=0):
        _copy_decoders(state, loaded, path)


def _copy_decoders(state, loaded: dict, path: str) -> None:
    own = state.decoders.state_dict()
    if loaded.keys() != own.keys() or any(loaded[k].shape != own[k].shape for k in own):
        raise LoptPatchError(
            f"{path} holds aux decoders for another patch (keys/shapes differ from this model's {len(own)} tensors); "
            "patch the model with the boundaries it was trained with."
        )
    with torch.no_grad():
        for name, target in own.items():
            src = loaded[name]
            local = getattr(target, "to_local", None)
            if callable(local):  # DTensor: copy the local shard of the full tensor
                from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

                src = distribute_tensor(src.to(target.device, target.dtype), target.device_mesh, target.placements)
                target.to_local().copy_(src.to_local())
            else:
                target.copy_(src.to(target.device, target.dtype))


# ----------------------------------------------------------------------------------------------
# the per-micro-batch weight of the aux term, as the trainer weights its own loss
# ----------------------------------------------------------------------------------------------


def _loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether ``Trainer.training_step`` leaves the loss undivided by the accumulation steps (its own rule)."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )


def _ga_steps(trainer) -> int:
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    return int(steps or trainer.args.gradient_accumulation_steps or 1)


def aux_weight(trainer, count, num_items_in_batch) -> tuple[float | torch.Tensor, float]:
    """``(w, post)``: the weight of a per-micro-batch mean inside the loss ``compute_loss`` returns, and
    the factor ``training_step`` applies afterwards (``1/GA`` or 1). ``w * post`` is the micro-batch's
    weight in its accumulation window, as the reference's ``loss / accumulation_steps`` has it."""
    scaled = _loss_is_scaled_for_ga(trainer, num_items_in_batch)
    if not scaled:
        return 1.0, 1.0 / _ga_steps(trainer)
    if num_items_in_batch is not None and count is not None:
        # Normalised by the window's label count: the micro-batch's share of it (item-weighted mean).
        n = num_items_in_batch.reshape(-1)[0] if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        w = item_share(count, n, count.device)  # 0, not NaN, for a window without labels
        if getattr(trainer.args, "average_tokens_across_devices", False):
            tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
            w = w * (trainer.accelerator.num_processes // max(tp, 1))
        return w, 1.0
    # The trainer divides its own per-micro-batch mean by the accumulation steps (TRL GRPO/RLOO).
    return 1.0 / _ga_steps(trainer), 1.0


# Autograd nodes that pass each output's gradient to the input at the same position only (and not to
# every input): DDP's ``find_unused_parameters`` path routes all model outputs through one of them.
_PASS_THROUGH = frozenset({"_DDPSinkBackward"})


# Identity Functions that wrap a module's output tensors one by one (DeepSpeed ZeRO-3's pre-backward hook on
# every module's outputs): the recorded aux may be such a wrapper of the tensor the loss was built from.
_OUTPUT_WRAPPERS = frozenset({"PreBackwardFunctionForModuleBackward"})


def _reaches(loss: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``target`` (as that exact output of its graph node, or the tensor an output wrapper such as
    ZeRO-3's took it from) is in ``loss``'s autograd graph."""
    fn, nr = target.grad_fn, target.output_nr
    if fn is None or loss.grad_fn is None:
        return False
    targets = {(fn, nr)}
    while fn is not None and fn.name() in _OUTPUT_WRAPPERS and len(fn.next_functions) == 1:
        fn, nr = fn.next_functions[0]
        if fn is not None:
            targets.add((fn, nr))
    seen, stack = set(), [(loss.grad_fn, loss.output_nr)]
    while stack:
        node, out = stack.pop()
        if (node, out) in targets:
            return True
        routed = node.name() in _PASS_THROUGH
        key = (node, out) if routed else node
        if key in seen:
            continue
        seen.add(key)
        edges = node.next_functions
        if routed:
            edges = edges[out : out + 1]
        stack.extend((nxt, idx) for nxt, idx in edges if nxt is not None)
    return False


def _batch_and_item_count(signature, args, kwargs):
    """``(inputs, num_items_in_batch)`` of a ``compute_loss`` call. The Trainers call ``compute_loss(model, inputs,
    num_items_in_batch=...)``; an override may name the batch otherwise or take the count through ``**kwargs``, so
    fall back to the position and the keyword the caller used, not only the override's parameter names."""
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = {}
    inputs = bound.get("inputs")
    if inputs is None and len(args) >= 2:
        inputs = args[1]
    num_items = kwargs.get("num_items_in_batch", bound.get("num_items_in_batch"))
    return inputs, num_items


class _ForwardRecorder:
    """A forward hook on the causal LM that collects each training forward's ``lopt_aux_loss``/``task_loss``."""

    def __init__(self):
        self.active = False
        self.records: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.unreadable = 0

    def __call__(self, module, args, kwargs, output):
        if not self.active or not module.training or not torch.is_grad_enabled():
            return None
        # lopt_aux_loss, not aux_loss: a MoE model's aux_loss is its router loss (already in its .loss).
        aux = output.get("lopt_aux_loss") if isinstance(output, dict) else None
        if torch.is_tensor(aux) and aux.requires_grad:
            self.records.append((aux, output.get("task_loss")))
        elif aux is None:
            self.unreadable += 1
        return None


# ----------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------

try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a dependency
    _CallbackBase = object


def _mean_over_processes(args, *values) -> list[float]:
    """``values`` (floats or 0-d tensors) averaged over the data-parallel processes, as the Trainer averages the
    ``loss`` it logs (``nested_gather(tr_loss).mean()``); on every process, from ``on_log`` (which every process
    runs). One process: the values themselves."""
    from transformers.trainer_pt_utils import nested_gather  # noqa: PLC0415

    device = next((v.device for v in values if torch.is_tensor(v)), args.device)
    local = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(()) for v in values])
    gathered = nested_gather(local[None], args.parallel_mode)
    return [float(v) for v in gathered.reshape(-1, len(values)).mean(0)]


class LoptCallback(_CallbackBase):
    """Installed by :func:`attach` (first in the callback list); not meant to be passed on its own.

    Adds ``task_loss`` and ``aux_loss`` to each training log, saves the aux decoders into each
    checkpoint directory and restores them on resume."""

    def __init__(self):
        self.trainer = None
        self.resume_dir: str | None = None
        self._task = 0.0
        self._aux = 0.0
        self._steps = 0
        self._pending_task = 0.0
        self._pending_aux = 0.0

    # bookkeeping fed by the compute_loss wrapper -------------------------------------------------
    def _record(self, task_contribution, aux_contribution):
        self._pending_task = self._pending_task + task_contribution
        self._pending_aux = self._pending_aux + aux_contribution

    def on_step_end(self, args, state, control, **kwargs):
        self._task = self._task + self._pending_task
        self._aux = self._aux + self._pending_aux
        self._pending_task = self._pending_aux = 0.0
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._steps == 0:
            return
        lam = _require_patched(self.trainer.model, attached=True).settings.lambda_aux
        task, aux = _mean_over_processes(args, self._task, self._aux)
        task, aux = task / self._steps, aux / self._steps
        self._task = self._aux = 0.0
        self._steps = 0
        values = {"task_loss": task, "aux_loss": aux, "lambda_aux": lam}
        # Trainer.log appended {**logs, "step": ...} to log_history before calling on_log: extend that entry
        # too, and ``logs`` itself for the reporting callbacks that run after this one.
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step and (
            state.log_history[-1].get("loss") == logs.get("loss")
        ):
            state.log_history[-1].update(values)

    # checkpoints ----------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: PLC0415

        run_dir = self.trainer._get_output_dir(trial=None) if hasattr(self.trainer, "_get_output_dir") else args.output_dir
        directory = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(directory):
            directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        write = bool(getattr(args, "should_save", True)) and os.path.isdir(directory)
        save_aux_decoders(self.trainer.model, directory, write=write)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.resume_dir is not None:
            load_aux_decoders(self.trainer.model, self.resume_dir)
            self.resume_dir = None
        lopt = _require_patched(self.trainer.model, attached=True)
        if optimizer is not None:
            in_optimizer = optimizer_param_ids(optimizer)
            missing = [p for p in lopt.decoders.parameters() if id(p) not in in_optimizer]
            if missing:
                raise LoptPatchError(
                    f"{len(missing)} aux decoder parameters are not in the optimiser, so the local loss could not "
                    "train them. Build the optimiser after lopt_kernels.attach(trainer) (or include "
                    "lopt_kernels.aux_decoders(model) parameters; lopt_kernels.param_groups does)."
                )
        self._task = self._aux = self._pending_task = self._pending_aux = 0.0
        self._steps = 0


# ----------------------------------------------------------------------------------------------
# attach
# ----------------------------------------------------------------------------------------------


def _check_synced_reference(trainer, model) -> None:
    """TRL's ``SyncRefModelCallback`` (``sync_ref_model=True``) mixes the policy's parameters into the reference
    model's pair by pair, in ``parameters()`` order: the policy's aux decoders (and, for a tied family, its untied
    head) have no partner in an unpatched reference, so the pairs would not line up."""
    for cb in trainer.callback_handler.callbacks:
        ref = getattr(cb, "ref_model", None)
        if type(cb).__name__ != "SyncRefModelCallback" or ref is None:
            continue
        ref = getattr(ref, "module", ref)  # a DeepSpeed engine or DDP wrapper
        names = [n for n, _ in unwrap_causal_lm(model).named_parameters()]
        ref_names = [n for n, _ in ref.named_parameters()]
        if names != ref_names:
            raise LoptPatchError(
                "sync_ref_model=True mixes the policy's parameters into the reference model's in parameters() order, "
                f"but the patched policy has {len(names)} parameters (its aux decoders, an untied output head) and "
                f"the reference {len(ref_names)}, so they do not line up (TRL fails after the first step, or mixes the "
                "wrong tensors). Pass ref_model=lopt_kernels.patch(<the reference model>) with the policy's settings: "
                "in eval mode it returns the unpatched logits, and its parameters pair with the policy's."
            )


def attach(trainer):
    """Make a ``transformers.Trainer`` (or any subclass: TRL's ``SFTTrainer``, ``GRPOTrainer``, ...) train
    a patched model with LoPT's semantics; returns the trainer. Call it after ``patch(model)`` and
    before ``trainer.train()``. Idempotent."""
    if getattr(trainer, _ATTACHED_ATTR, None) is not None:
        return trainer
    model = trainer.model
    state = _require_patched(model)
    if getattr(trainer.args, "n_gpu", 1) > 1:
        raise LoptPatchError(
            "torch.nn.DataParallel (several GPUs in one process) replicates the model on every forward, which "
            "the LoPT hooks do not support; launch one process per GPU (torchrun / accelerate launch) instead."
        )
    if getattr(trainer, "optimizer", None) is not None:
        in_optimizer = optimizer_param_ids(trainer.optimizer)
        if not all(id(p) in in_optimizer for p in state.decoders.parameters()):
            raise LoptPatchError(
                "the trainer's optimiser was built without the aux decoders' parameters; build it after "
                "lopt_kernels.attach(trainer), or from lopt_kernels.param_groups(model, ...)."
            )
    ensure_aux_trainable(model)
    _check_synced_reference(trainer, model)

    callback = LoptCallback()
    callback.trainer = trainer
    trainer.callback_handler.callbacks.insert(0, callback)  # before the reporting integrations see the logs

    recorder = _ForwardRecorder()
    lm = unwrap_causal_lm(model)
    handle = lm.register_forward_hook(recorder, with_kwargs=True)

    original_compute_loss = trainer.compute_loss
    signature = inspect.signature(original_compute_loss)

    def compute_loss(*args, **kwargs):
        inputs, num_items = _batch_and_item_count(signature, args, kwargs)
        count = label_count(inputs)  # before compute_loss (it may pop the labels)
        nonlocal handle
        lopt = _require_patched(trainer.model, attached=True)  # unpatched since attach: say so, never train silently
        hooks = lopt.causal_lm._forward_hooks
        if handle.id not in hooks:  # another model since attach (model_init: Trainer.train() builds a new one)
            handle.remove()
            handle = callback._hook_handle = lopt.causal_lm.register_forward_hook(recorder, with_kwargs=True)
        hooks.move_to_end(handle.id)  # after patch's own hook (which adds aux_loss), even if re-patched since
        recorder.records, recorder.unreadable, recorder.active = [], 0, True
        try:
            result = original_compute_loss(*args, **kwargs)
        finally:
            recorder.active = False
            records, unreadable = recorder.records, recorder.unreadable
            recorder.records = []
        if unreadable and not records:
            raise LoptPatchError(
                "a training forward of the patched model returned no lopt_aux_loss (return_dict=False?): LoPT needs the "
                "ModelOutput to find the local loss."
            )
        if not records:
            return result
        loss = result[0] if isinstance(result, tuple) else result
        w, post = aux_weight(trainer, count, num_items)
        lam = lopt.settings.lambda_aux
        auxes = [aux for aux, _ in records]
        missing = [aux for aux in auxes if not _reaches(loss, aux)]
        if missing:
            share = sum(m.to(loss.device, torch.float32) for m in missing) / len(auxes)
            loss = loss + (lam * w * share).to(loss.dtype)
            result = (loss, *result[1:]) if isinstance(result, tuple) else loss
        with torch.no_grad():
            aux_mean = sum(a.detach().float().to(loss.device) for a in auxes) / len(auxes)
            aux_part = w * post * aux_mean
            callback._record(loss.detach().float() * post - lam * aux_part, aux_part)
        return result

    trainer.compute_loss = compute_loss

    original_train = trainer.train

    def train(*args, **kwargs):
        resume = inspect.signature(original_train).bind_partial(*args, **kwargs).arguments.get("resume_from_checkpoint")
        if resume is False:
            resume = None
        if isinstance(resume, bool) and resume:
            from transformers.trainer_utils import get_last_checkpoint  # noqa: PLC0415

            resume = get_last_checkpoint(trainer.args.output_dir)
        callback.resume_dir = resume
        _require_patched(trainer.model, attached=True)
        ensure_aux_trainable(trainer.model)
        return original_train(*args, **kwargs)

    trainer.train = train
    setattr(trainer, _ATTACHED_ATTR, callback)
    callback._hook_handle = handle
    return trainer

