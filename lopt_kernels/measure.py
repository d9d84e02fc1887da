"""Measuring a training step: peak memory of its allocations and wall time."""

from __future__ import annotations

import time

import torch


def step_peak_bytes(step_fn, device: torch.device) -> tuple[int, object]:
    """Run ``step_fn()`` once; return (peak bytes allocated by it above what was live before, its result).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the allocator's own
    allocation/free events recorded by ``torch.profiler`` (deterministic, unlike RSS).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step_fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step_fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


def timed(step_fn, device: torch.device) -> tuple[float, object]:
    """Wall seconds of ``step_fn()`` (synchronised on CUDA) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result
