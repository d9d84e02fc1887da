"""Causal-LM task loss without logits: a fused linear cross-entropy.

On CUDA it dispatches to Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (Triton;
supports final-logit soft-capping). Elsewhere it runs ``ChunkedLinearCrossEntropy``, a loop of
plain PyTorch ops over row chunks that computes the gradients during the forward, as Liger does.
torch's native ``torch.nn.functional.linear_cross_entropy`` (``impl="torch"``) stays selectable, but
on CPU it was slower, held more and, in bf16, was less exact than that loop (``bench/task_loss_chunking.py``).
All compute ``cross_entropy(hidden @ W.T + b, target)`` chunk by chunk so the (tokens x vocab)
logits never exist whole.

Semantics match transformers' ``ForCausalLMLoss``: fp32 loss, ``ignore_index=-100``, mean over
non-ignored targets, or ``sum / num_items_in_batch`` when that is given. A batch with no counted
target (every label -100) gives the model's NaN loss (``0 / 0``; ``num_items_in_batch == 0`` with counted
targets: ``sum / 0``, inf, as the model's) and, as the model's ``cross_entropy`` does, zero gradients (never
NaN ones).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "liger", "torch", "chunked")
IGNORE_INDEX = -100
# Rows per chunk, at least: below that the loop's per-chunk cost (reading the head's weight twice, and its fp32
# gradient once more when it trains) outweighs the memory a smaller chunk saves (bf16 255 x 256 x 8016, head trained,
# 1 thread, forward + backward: 8 rows 118.7 ms, 16 rows 71.1, 32 rows 45.9; torch's op 257.2).
MIN_CHUNK_ROWS = 32
HIDDEN_MULTIPLE = 4  # a chunk's temporaries at most this many times the hidden input's bytes (see chunk_rows)


def torch_linear_cross_entropy_available() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def check_softcap(softcap, name: str = "softcap") -> None:
    """Raise ``ValueError`` unless ``softcap`` is None (no soft-capping) or a finite number > 0: the logits are
    ``softcap * tanh(logits / softcap)``, so 0 divides by zero (every logit 0, or NaN) and inf gives ``inf * 0``."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"{name} must be a finite number > 0, or None for no soft-capping; got {softcap!r}")


def resolve_implementation(impl: str, device: torch.device, softcap: float | None) -> str | None:
    """The implementation that will run, or None when no fused one can honour the request. A ``softcap`` that is not
    None or a finite number > 0 raises ``ValueError`` (``check_softcap``) whatever the implementation."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"fused linear cross-entropy implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    check_softcap(softcap)
    if impl == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "chunked"
    if impl == "torch" and (softcap is not None or not torch_linear_cross_entropy_available()):
        return None  # torch's op has no soft-capping
    return impl


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    """Whether Liger-Kernel's fused linear cross-entropy imports (asked once per process)."""
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
    """``labels[..., 1:]`` padded with -100 at the end: position t predicts token t + 1."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    num_items_in_batch=None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal-LM loss of ``hidden`` (..., h) through the head ``weight`` (V, h) against ``shift_labels`` (...), integer
    labels of any width (int64 or int32 alike in every implementation)."""
    h = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, h)
    if shift_labels.is_floating_point() or shift_labels.is_complex() or shift_labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor (int64 or int32, -100 ignored), got "
                         f"{shift_labels.dtype}")
    # int64 for every implementation: torch's op takes no int32 target, which collators can produce (and the others
    # take), so the dtype never decides whether a call runs
    target = shift_labels.reshape(-1).to(hidden2.device, torch.long, non_blocking=True)
    if target.shape[0] != hidden2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden2.shape[0]} hidden rows but {target.shape[0]} labels")
    chosen = resolve_implementation(impl, hidden.device, softcap)
    if chosen is None:
        raise ValueError(f"no fused linear cross-entropy honours softcap={softcap} on {hidden.device.type} with impl={impl!r}")
    # Always the summed loss, divided here: ``0 / 0`` is the model's NaN loss for a batch without counted
    # targets, while the gradient of that division is taken as 0 (not inf, which the fused ops would turn
    # into NaN gradients against their zero per-row gradients).
    if chosen == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: PLC0415

        loss = LigerFusedLinearCrossEntropyFunction.apply(
            hidden2, weight, target, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", softcap
        )
        loss = loss[0] if isinstance(loss, tuple) else loss
    elif chosen == "chunked":
        if not torch.is_grad_enabled():  # its forward would compute gradients for inputs that require them
            hidden2, weight = hidden2.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
        loss = ChunkedLinearCrossEntropy.apply(hidden2, weight, target, bias, softcap)
    elif hidden2.dtype == torch.float32:
        # torch's own "sum" reduction: its "none" reduction runs about twice as long on CPU (2 cores, 1024 rows,
        # h 1024, vocab 32000: 26 s against 11-18 s forward + backward)
        loss = F.linear_cross_entropy(
            hidden2, weight, target, linear_bias=bias, reduction="sum", ignore_index=IGNORE_INDEX,
            options=torch.nn.LinearCrossEntropyOptions(),
        )
    else:
        # Per-row losses summed in fp32: torch's op returns a "sum" reduction in the input dtype, which in bf16
        # is ~1% off the model's loss (it upcasts logits to fp32); the per-row values round independently.
        loss = F.linear_cross_entropy(
            hidden2, weight, target, linear_bias=bias, reduction="none", ignore_index=IGNORE_INDEX,
            options=torch.nn.LinearCrossEntropyOptions(),
        ).float().sum()
    loss = loss.float()
    if num_items_in_batch is None:
        denominator = (target != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        # non_blocking: a host tensor's copy must not wait for the device (no sync in the training step).
        denominator = num_items_in_batch.to(loss.device, non_blocking=True)
    else:
        denominator = num_items_in_batch
    return _SafeDivide.apply(loss, denominator) if torch.is_tensor(denominator) else _divide_by_number(loss, denominator)


def _divide_by_number(loss: torch.Tensor, denominator) -> torch.Tensor:
    if denominator == 0:
        return _SafeDivide.apply(loss, torch.zeros((), device=loss.device))
    return loss / denominator


class _SafeDivide(torch.autograd.Function):
    """``numerator / denominator`` whose gradient is 0 where the denominator is 0 (no inf, so no NaN
    gradients from the fused ops' zero rows). No host-device sync: it stays a tensor expression."""

    @staticmethod
    def forward(ctx, numerator, denominator):
        denominator = denominator.to(numerator.dtype)
        ctx.save_for_backward(denominator)
        return numerator / denominator

    @staticmethod
    def backward(ctx, grad):
        (denominator,) = ctx.saved_tensors
        safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        return torch.where(denominator == 0, torch.zeros_like(grad), grad / safe), None


def chunk_rows(rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the most (a power of two, at least ``MIN_CHUNK_ROWS``) whose (chunk x vocab) temporaries (fp32
    logits, and their copy in ``dtype`` when that is narrower) stay within half the head weight's bytes and within
    ``HIDDEN_MULTIPLE`` times the hidden input's. Each chunk re-reads the weight, and once that leaves the cache
    small chunks are slow (``bench/task_loss_chunking.py --library-chunks``: h 1024, vocab 32000, 1023 rows, fp32,
    head frozen, 2 threads, forward + backward: 32 rows 2056 ms, 128 rows 1164, 512 rows 878, the whole logits 945 ms
    at a 375 MiB peak against 8 / 20 / 69 MiB); the hidden bound keeps the loss's share of a
    step's peak small (there, ``compare --config cpu-1b --seq 512 --lora 16 --fake``'s lopt step peak: 668.0 MiB with
    512-row chunks, 619.6 with the 128 rows this gives)."""
    width = dtype.itemsize
    per_logit = 4 + (width if width < 4 else 0)
    fit = min(hidden * width // (2 * per_logit), HIDDEN_MULTIPLE * rows * hidden * width // (max(vocab, 1) * per_logit))
    return min(max(rows, 1), max(MIN_CHUNK_ROWS, 1 << (max(fit, 1).bit_length() - 1)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed ``cross_entropy(softcap(hidden @ weight.T + bias), target)`` over row chunks, exactly as a causal LM's
    own loss computes it: logits in the input dtype (the head's output), soft-capped there, then upcast to fp32 for
    the log-softmax; per-row losses summed in fp32. The gradients are computed chunk by chunk during the forward
    (a chunk's fp32 logits are freed before the next), so the backward only scales them: one backward per forward.

    Args: hidden (N, H), weight (V, H), target (N,) with -100 for ignored rows, bias (V,) or None, softcap or None,
    rows_per_chunk (None: ``chunk_rows``'s choice).
    Returns: the fp32 sum of the counted rows' losses (0 when none counts).
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, softcap, rows_per_chunk=None):
        check_softcap(softcap)
        rows, vocab = hidden.shape[0], weight.shape[0]
        need = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if need[0] else None
        # the weight's and bias's gradients accumulate in fp32 over the chunks, rounded once in the backward
        fp32 = dict(dtype=torch.float32, device=weight.device)
        grad_weight = torch.zeros(weight.shape, **fp32) if need[1] else None
        grad_bias = torch.zeros(vocab, **fp32) if bias is not None and need[3] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = rows_per_chunk or chunk_rows(rows, hidden.shape[1], vocab, hidden.dtype)
        for start in range(0, rows, step):
            # one call per chunk: its (chunk x vocab) buffers are freed before the next chunk's are allocated
            total += _chunk_loss_and_grads(hidden[start:start + step], weight, bias, target[start:start + step],
                                           softcap, grad_hidden, grad_weight, grad_bias, start)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if torch.is_grad_enabled():  # create_graph=True: gradients without their second-order terms would be wrong
            raise RuntimeError(
                "lopt_kernels: the chunked linear cross-entropy computes its gradients in the forward and has no "
                "double backward (create_graph=True); patch with fused_ce='off' for the model's own, twice-"
                "differentiable loss"
            )
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        # the fp32 scale multiplies the rounded gradient (a 0-d tensor does not round to the input dtype first)
        return (grad_hidden.mul_(grad_total) if need[0] else None,
                grad_weight.mul_(grad_total).to(ctx.dtypes[0]) if need[1] else None,
                None,
                grad_bias.mul_(grad_total).to(ctx.dtypes[1]) if need[3] else None,
                None, None)


def _chunk_loss_and_grads(h, weight, bias, t, softcap, grad_hidden, grad_weight, grad_bias, start):
    """One chunk of ``ChunkedLinearCrossEntropy``: its summed loss; its gradients written (``grad_hidden``'s rows
    from ``start``) or accumulated (``grad_weight``, ``grad_bias``) into the buffers that are not None."""
    logits = F.linear(h, weight, bias)
    if softcap is not None:
        capped = torch.tanh(logits / softcap)  # in the head's dtype, as the model's forward caps them
        logits = capped * softcap
    logits = logits.float()
    counted = t != IGNORE_INDEX
    safe_t = torch.where(counted, t, 0).unsqueeze(1)
    target_logit = logits.gather(1, safe_t).squeeze(1)
    # log-sum-exp by hand so that its exponentials become the softmax in place of the logits (torch.logsumexp would
    # hold a second chunk x vocab fp32 buffer)
    row_max = logits.amax(dim=1, keepdim=True)
    softmax = logits.sub_(row_max).exp_()
    sum_exp = softmax.sum(dim=1, keepdim=True)
    loss = ((row_max + sum_exp.log()).squeeze(1) - target_logit).mul_(counted).sum()
    if grad_hidden is None and grad_weight is None and grad_bias is None:
        return loss
    grad_logits = softmax.div_(sum_exp)
    grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=grad_logits.dtype))
    grad_logits.mul_(counted.unsqueeze(1))
    if softcap is not None:
        grad_logits.mul_(capped.float().square_().neg_().add_(1))  # d(cap tanh(z / cap)) / dz
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t(), h.float())
    if grad_hidden is not None:
        grad_hidden[start:start + h.shape[0]] = grad_logits.to(h.dtype) @ weight
    return loss
