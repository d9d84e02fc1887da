"""Measuring a training step: peak memory (split by kind), FLOPs and wall time.

Memory: on CUDA, ``max_memory_allocated`` after ``reset_peak_memory_stats`` (what the caching
allocator really handed out). On CPU and under ``FakeTensorMode`` (no allocation at all), a
dispatch mode that follows every storage the step's ops allocate until it is freed: a
deterministic count of live tensor bytes, unlike process RSS. Gradients are allocated by the
warm-up step beforehand, so the step peak is activations and temporaries.

The dispatcher shows an op's outputs, not what its kernel allocates and frees inside. For ATen
kernels that is scratch (CPU flash attention's per-thread buffers: a few MiB); a
``torch.library.custom_op`` written in Python, though, can hold whole chunks of intermediates
(the reconstruction loss). Those ops run their Python body under the mode, so its ops count too.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_aten = torch.ops.aten


def _register_cpu_sdpa_flops() -> None:
    """torch counts the CPU flash-attention kernels as zero FLOPs; give them the sdpa formulas."""
    registry = flop_counter.flop_registry
    fwd = _aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    if fwd not in registry:
        @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd not in registry:
        @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                    **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


def _register_chunked_linear_cross_entropy_flops() -> None:
    """torch's chunked ``linear_cross_entropy`` with a mean or sum reduction is one opaque custom op that computes
    the logits and, in the same pass, the gradients its flags ask for (its backward only scales them): 2 N h V
    FLOPs for the logits and 2 N h V for each gradient."""
    try:
        import torch.nn.modules.linear_cross_entropy  # noqa: F401, PLC0415 - registers the op
        op = torch.ops.torch_nn._linear_cross_entropy_batch_chunked
    except (ImportError, AttributeError):  # a torch without it
        return
    if op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _chunked_lce_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for size in input_shape[:-1]:
            rows *= size
        per_product = 2 * rows * input_shape[-1] * weight_shape[0]
        compute_input_grad, compute_weight_grad = args[10], args[11]  # after target, the biases and the options
        return per_product * (1 + bool(compute_input_grad) + bool(compute_weight_grad))


_register_chunked_linear_cross_entropy_flops()


@dataclass
class StepMemory:
    """Bytes at the step's peak: parameters and buffers, gradients, and what the step itself allocated."""

    params: int
    grads: int
    step_peak: int  # peak of the step's own allocations (activations, temporaries) above what was live before


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _custom_op_body(func, args, kwargs):
    """The Python implementation that ``func`` (a ``torch.library.custom_op``) runs for its tensors'
    device, or None for any other op (ATen, C++ kernels), whose inside the dispatcher cannot show."""
    get_opdef = getattr(torch._library.custom_ops, "_maybe_get_opdef", None)
    opdef = get_opdef(func) if get_opdef is not None and isinstance(func, torch._ops.OpOverload) else None
    if opdef is None:
        return None
    device = next((t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
    return opdef._backend_fns.get(device, opdef._backend_fns.get(None))


class _StepAllocations(TorchDispatchMode):
    """Live bytes of the storages that ops allocate while the mode is active, and their peak.

    An op output counts as an allocation when its storage is none of the op's inputs' storages
    (views and in-place results share one); it stops counting when its storage is freed. A Python
    custom op is not counted as one op: its body runs under the mode, so the temporaries it frees
    before returning count too (see the module docstring). Works for real and fake tensors alike,
    since it reads sizes, never data (under fake tensors a custom op's body runs on them, and only
    an op whose body cannot, e.g. one that reads values, falls back to its fake implementation)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_op_body(func, args, kwargs)
        if body is not None:
            fake = any(isinstance(t, FakeTensor) for t in tree_flatten((args, kwargs))[0])
            try:
                with self:  # the dispatcher popped this mode for the op; the body's ops must see it
                    return body(*args, **kwargs)
            except Exception:
                if not fake:
                    raise
                # A body that cannot run on fake tensors (it reads values): its outputs count, as for any op;
                # what it allocated before failing stops counting as it is freed.
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._counted:
                continue
            nbytes = storage.nbytes()
            self._counted[storage] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, nbytes)
        return out


def measure_step(step_fn, model: torch.nn.Module, device: torch.device, *, memory=True, flops=True,
                 fake_mode=None) -> tuple[StepMemory | None, int | None]:
    """Run ``step_fn()`` once; return its memory (see module docstring) and its FLOPs."""
    counter = _FlopCounter() if flops else contextlib.nullcontext()
    tracker = _StepAllocations() if memory and (device.type != "cuda" or fake_mode is not None) else None
    params = _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers())
    grads_before = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    cuda_memory = memory and tracker is None
    if cuda_memory:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    # The FLOP counter entered last (the first mode each op meets): a custom op whose body the tracker runs under
    # itself stays one op for the counter, whether or not memory is measured.
    with (fake_mode if fake_mode is not None else contextlib.nullcontext(),
          tracker if tracker is not None else contextlib.nullcontext(), counter):
        step_fn()
    grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    mem = None
    if cuda_memory:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        mem = StepMemory(params, grads, max(peak - (grads - grads_before), 0))
    elif tracker is not None:
        mem = StepMemory(params, grads, tracker.peak)
    return mem, (counter.total if flops else None)


class _FlopCounter(TorchDispatchMode):
    """Sums torch's registered FLOP formulas over every dispatched op. Unlike ``FlopCounterMode`` it
    tracks no modules, so it also runs through a nested ``torch.autograd.grad`` (the boundary's
    rebuild), which the module tracker's autograd hooks refuse."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _formula(func._overloadpacket)
        if formula is not None:
            try:
                self.total += formula(*args, **kwargs, out_val=out)
            except AssertionError:
                # Older torch's attention formulas assert equal query and key/value heads; grouped-query
                # attention (fewer key/value heads, broadcast by the kernel) costs what the broadcast heads do.
                self.total += formula(*_broadcast_heads(args), **_broadcast_heads(kwargs), out_val=out)
        return out


def _formula(packet):
    """torch's FLOP formula for ``packet``; an in-place op (``addmm_``, which torch's chunked fused cross-entropy
    accumulates the head's gradient with) costs what its out-of-place form does."""
    formula = flop_counter.flop_registry.get(packet)
    name = getattr(packet, "__name__", "")
    if formula is None and name.endswith("_") and not name.startswith("_"):
        formula = flop_counter.flop_registry.get(getattr(torch.ops.aten, name[:-1], None))
    return formula


def _broadcast_heads(values):
    """``values`` (a tuple or dict) with every 4-D (batch, heads, seq, dim) tensor that has fewer heads than the
    most any of them has replaced by a meta tensor with that many heads (FLOP formulas read only shapes)."""
    items = values.values() if isinstance(values, dict) else values
    heads = max((t.shape[1] for t in items if torch.is_tensor(t) and t.dim() == 4), default=0)

    def widen(t):
        if torch.is_tensor(t) and t.dim() == 4 and 0 < t.shape[1] < heads and heads % t.shape[1] == 0:
            return torch.empty((t.shape[0], heads, *t.shape[2:]), dtype=t.dtype, device="meta")
        return t

    if isinstance(values, dict):
        return {k: widen(v) for k, v in values.items()}
    return tuple(widen(v) for v in values)


def timed(step_fn, device: torch.device) -> float:
    """Wall seconds of ``step_fn()`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
