"""The task loss without logits, the op alone: every implementation against the cross-entropy of materialised
logits, and the chunked loop's numerics, memory and chunking."""

import pytest
import torch

from lopt_kernels.ops.linear_cross_entropy import linear_cross_entropy, shift_labels_of

@pytest.mark.parametrize("impl", ["torch", "liger", "chunked"])
@pytest.mark.parametrize("num_items", [None, 13])
def test_linear_cross_entropy_matches_cross_entropy(impl, num_items):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 24, generator=g, requires_grad=True)
    weight = torch.randn(37, 24, generator=g, requires_grad=True)
    bias = torch.randn(37, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 7), generator=g)
    labels[0, :3] = -100
    target = shift_labels_of(labels)
    logits = (hidden @ weight.T + bias).float()
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 37), target.reshape(-1), ignore_index=-100,
                                            reduction="sum" if num_items else "mean")
    ref = ref / num_items if num_items else ref
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, impl=impl,
                                num_items_in_batch=torch.tensor(num_items) if num_items else None)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    ref_grads = torch.autograd.grad(ref, [hidden, weight, bias])
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_torch_fused_loss_in_bf16_sums_in_fp32():
    """torch's op returns a bf16 "sum" for bf16 inputs (~1% off the model's fp32-upcast loss); the per-row
    losses are summed in fp32 instead."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 64, generator=g).bfloat16()
    weight = (torch.randn(2000, 64, generator=g) * 0.2).bfloat16()
    target = torch.randint(0, 2000, (512,), generator=g)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), target)
    loss = linear_cross_entropy(hidden, weight, target, impl="torch")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=5e-4, atol=0)


# ----------------------------------------------------------------------------------------------
# the chunked implementation (the default off CUDA)
# ----------------------------------------------------------------------------------------------

_CHUNKED_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _reference_loss(hidden, weight, bias, target, softcap):
    """A causal LM's own loss: the head's logits in its dtype, soft-capped there, upcast, mean cross-entropy."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("head_trains", [True, False], ids=["head-trains", "head-frozen"])
def test_chunked_loss_and_gradients_are_the_models_own(dtype, softcap, head_trains):
    """77 rows cross two 32-row chunks and a 13-row tail; some rows ignored; a bias; a frozen head takes the
    loop's no-weight-gradient branch. The loss is the model's to fp32 rounding in every dtype (its per-row losses
    are summed in fp32, never rounded to the input dtype); gradients within the dtype's tolerance."""
    from lopt_kernels.ops.linear_cross_entropy import MIN_CHUNK_ROWS, chunk_rows

    g = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab = 77, 24, 301
    assert chunk_rows(rows, hidden_size, vocab, dtype) == MIN_CHUNK_ROWS == 32
    hidden = torch.randn(rows, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.3).to(dtype).requires_grad_(head_trains)
    bias = torch.randn(vocab, generator=g).to(dtype).requires_grad_(head_trains)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[[0, 5, 40, 76]] = -100
    ref = _reference_loss(hidden, weight, bias, target, softcap)
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, softcap=softcap, impl="chunked")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=0)
    inputs = [hidden, weight, bias] if head_trains else [hidden]
    for got, want, name in zip(torch.autograd.grad(loss * 3, inputs), torch.autograd.grad(ref * 3, inputs),
                               ["hidden", "weight", "bias"]):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), **_CHUNKED_TOL[dtype], msg=name)


def test_chunked_loss_holds_one_chunk_of_fp32_logits_and_a_copy():
    """The loop's peak (exact dispatcher count) is one chunk's fp32 logits, turned into the softmax in place, and
    their rounded copy for the input gradient's matmul, over the gradient buffers: never the (rows x vocab) logits,
    and no third chunk-sized buffer (``torch.logsumexp`` would add one)."""
    from lopt_kernels.measure import _StepAllocations
    from lopt_kernels.ops.linear_cross_entropy import chunk_rows

    g = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab = 255, 64, 4000
    hidden = torch.randn(rows, hidden_size, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.1).bfloat16()
    target = torch.randint(0, vocab, (rows,), generator=g)
    with _StepAllocations() as tracker:
        linear_cross_entropy(hidden, weight, target, impl="chunked").backward()
    chunk = chunk_rows(rows, hidden_size, vocab, torch.bfloat16)
    assert chunk == 32
    chunk_bytes = chunk * vocab * (4 + 2)
    assert chunk_bytes < tracker.peak <= chunk_bytes + 3 * rows * hidden_size * 2 + 64 * 1024, tracker.peak


@pytest.mark.parametrize("rows,hidden_size,vocab,dtype,expected", [
    (4096, 256, 8016, torch.bfloat16, 32),  # both bounds under the 32-row floor
    (4096, 1024, 32000, torch.bfloat16, 128),  # half the weight binds
    (4096, 1024, 32000, torch.float32, 512),  # half the weight binds
    (1023, 1024, 32000, torch.float32, 128),  # 4 x the hidden input binds
    (20, 1024, 32000, torch.float32, 20),  # never more than the rows
])
def test_chunk_rows_keep_the_temporaries_within_half_the_head_weight_and_four_hidden_inputs(rows, hidden_size, vocab,
                                                                                             dtype, expected):
    """A chunk's (rows x vocab) temporaries (fp32 logits, plus their copy in a narrower dtype) stay within half the
    head weight's bytes and 4 x the hidden input's, as the largest power of two, never under 32 rows."""
    from lopt_kernels.ops.linear_cross_entropy import chunk_rows

    width = dtype.itemsize
    per_logit = 4 + (width if width < 4 else 0)
    chunk = chunk_rows(rows, hidden_size, vocab, dtype)
    assert chunk == expected
    budget = min(vocab * hidden_size * width / 2, 4 * rows * hidden_size * width)
    assert chunk in (32, rows) or chunk * vocab * per_logit <= budget < 2 * chunk * vocab * per_logit


def test_chunked_loss_under_no_grad_computes_no_gradients():
    """Under ``torch.no_grad()`` the loop skips the gradients even for inputs that require them: before, it still
    allocated the fp32 (vocab x hidden) weight-gradient buffer and ran both gradient matmuls (3x the time)."""
    from lopt_kernels.measure import _StepAllocations

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, 256, generator=g, requires_grad=True)
    weight = torch.randn(500, 256, generator=g, requires_grad=True)
    target = torch.randint(0, 500, (70,), generator=g)
    with torch.no_grad(), _StepAllocations() as tracker:
        loss = linear_cross_entropy(hidden, weight, target, impl="chunked")
    assert tracker.peak < 500 * 256 * 4 / 2, tracker.peak  # the weight gradient's buffer alone is 500 x 256 x 4
    ref = torch.nn.functional.cross_entropy(hidden.detach() @ weight.detach().T, target)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_chunked_loss_refuses_a_double_backward():
    """Its gradients are computed in the forward: ``create_graph=True`` raises rather than returning gradients
    without their second-order terms (it returned a graph-less gradient silently, so a gradient penalty added to
    a loss contributed nothing)."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (5,)), impl="chunked")
    with pytest.raises(RuntimeError, match="no double backward.*fused_ce='off'"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("impl", ["torch", "liger", "chunked"])
def test_int32_labels_give_what_int64_labels_give(impl):
    """Collators can produce int32 labels: every implementation takes them as int64 (before: ``impl="torch"`` raised
    torch's 'expected target dtype to be Long or Byte, but got Int' where the others ran)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    labels[1] = -100
    want = linear_cross_entropy(hidden, weight, labels, impl=impl)
    got = linear_cross_entropy(hidden, weight, labels.int(), impl=impl)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_labels_raise_value_error(dtype):
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        linear_cross_entropy(torch.randn(5, 8), torch.randn(11, 8), torch.zeros(5, dtype=dtype), impl="chunked")


@pytest.mark.parametrize("softcap", [0, 0.0, -3.0, float("inf"), float("nan")])
@pytest.mark.parametrize("impl", ["auto", "torch", "liger", "chunked"])
def test_softcap_that_is_not_positive_and_finite_raises_value_error(impl, softcap):
    """softcap * tanh(logits / softcap) needs a finite softcap > 0. Before: softcap=0 ran in the chunked loop
    (logits / 0 = +-inf, tanh * 0 = 0: the loss log(vocab) for every row, NaN where a logit was 0), while
    impl="torch" said no fused loss honours soft-capping. Now every implementation and the autograd Function raise
    the same ValueError."""
    from lopt_kernels.ops.linear_cross_entropy import ChunkedLinearCrossEntropy, resolve_implementation

    hidden, weight, target = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8), torch.randint(0, 11, (5,))
    with pytest.raises(ValueError, match=r"softcap must be a finite number > 0, or None"):
        linear_cross_entropy(hidden, weight, target, softcap=softcap, impl=impl)
    with pytest.raises(ValueError, match=r"softcap must be a finite number > 0, or None"):
        resolve_implementation(impl, hidden.device, softcap)
    with pytest.raises(ValueError, match=r"softcap must be a finite number > 0, or None"):
        ChunkedLinearCrossEntropy.apply(hidden, weight, target, None, softcap)
