"""measure_step's CPU step peak (a dispatch-mode count) against the allocator's own events (the profiler)."""

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lopt_kernels import compare
from lopt_kernels.measure import _StepAllocations, measure_step

pytestmark = pytest.mark.explicit_modes  # compare's variants name their modes themselves

TEMP_ROWS = 256  # the custom op below frees a TEMP_ROWS x 1024 fp32 temporary (1 MiB) before returning


@torch.library.custom_op("lopt_kernels_test::column_sums_via_temporary", mutates_args=())
def _column_sums(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(TEMP_ROWS // x.shape[0], 1).sum(0)


@_column_sums.register_fake
def _(x):
    return x.new_empty(x.shape[1:])


@torch.library.custom_op("lopt_kernels_test::reads_a_value", mutates_args=())
def _reads_a_value(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()


@_reads_a_value.register_fake
def _(x):
    return torch.empty_like(x)


def _profiler_peak(fn) -> int:
    """Peak of the running sum of the CPU allocator's allocation and free events during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _dispatch_peak(fn, fake_mode=None) -> int:
    tracker = _StepAllocations()
    if fake_mode is None:
        with tracker:
            fn()
    else:
        with fake_mode, tracker:
            fn()
    return tracker.peak


def test_custom_op_temporaries_count():
    """The dispatcher shows a custom op's output only; its Python body's temporaries count as well."""
    x = torch.randn(4, 1024)
    temporary = TEMP_ROWS * 1024 * 4
    counted = _dispatch_peak(lambda: torch.ops.lopt_kernels_test.column_sums_via_temporary(x))
    assert counted == temporary + 1024 * 4  # the temporary and the result, live together
    assert counted == _profiler_peak(lambda: torch.ops.lopt_kernels_test.column_sums_via_temporary(x))


def test_custom_op_temporaries_count_under_fake_tensors():
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        x = torch.empty(4, 1024)
    counted = _dispatch_peak(lambda: torch.ops.lopt_kernels_test.column_sums_via_temporary(x), fake_mode)
    assert counted == TEMP_ROWS * 1024 * 4 + 1024 * 4


def test_custom_op_that_reads_values_falls_back_to_its_fake_under_fake_tensors():
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        x = torch.empty(8, 16)
    counted = _dispatch_peak(lambda: torch.ops.lopt_kernels_test.reads_a_value(x), fake_mode)
    assert counted >= 8 * 16 * 4  # at least its output; no error


def test_flops_do_not_depend_on_measuring_memory():
    """The tracker runs a custom op's body under itself; the FLOP counter still sees the op as one op."""
    x = torch.randn(64, 64)

    def step():
        torch.ops.lopt_kernels_test.column_sums_via_temporary(x @ x)

    model = torch.nn.Linear(1, 1)
    with_memory = measure_step(step, model, torch.device("cpu"), memory=True)[1]
    without = measure_step(step, model, torch.device("cpu"), memory=False)[1]
    assert with_memory == without == 2 * 64**3


SMALL_CONFIG = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(SMALL_CONFIG))
    return compare.load_config(str(path))


# The variants compare's step-peak targets relate (each run costs seconds: the profiler, a model build).
@pytest.mark.parametrize("variant", ["e2e+ckpt+fce", "lopt+ckpt", "lopt-af+ckpt"])
def test_step_peak_matches_the_profiler(variant, small_config):
    """compare's CPU step peak agrees with the allocator's events over the same step."""
    v = compare.VARIANTS[variant]
    cpu = torch.device("cpu")
    model = compare.build_model(small_config, v, dtype=torch.float32, device=cpu, lora=0, seed=0)
    step = compare.make_step(model, v, compare.synthetic_batch(small_config, 2, 64, 0, cpu))
    step()  # warm-up: gradients exist from here on
    model.zero_grad(set_to_none=False)
    mem, _ = measure_step(step, model, cpu, flops=False)
    model.zero_grad(set_to_none=False)
    profiled = _profiler_peak(step)
    assert mem.step_peak == pytest.approx(profiled, rel=0.03)


def test_flop_counter_counts_grouped_query_attention_where_the_formula_asserts_equal_heads(monkeypatch):
    """torch <= 2.11's attention FLOP formulas assert as many key/value heads as query heads; on CUDA every
    grouped-query model's step then failed to count (the GPU step benchmark errored on every variant). The
    counter broadcasts the key/value heads instead: GQA costs what the broadcast heads cost."""
    import torch.nn.functional as F
    from torch.utils import flop_counter

    from lopt_kernels.measure import _FlopCounter

    def old_style_formula(query, key, value, *args, out_val=None, **kwargs):
        b, h, s_q, d = query.shape
        assert key.shape[1] == h and value.shape[1] == h, "sdpa: heads differ"
        return 4 * b * h * s_q * key.shape[2] * d

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setitem(flop_counter.flop_registry, op, old_style_formula)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 16, generator=g)
    k, v = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    counts = []
    for key, value, gqa in ((k, v, True), (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), False)):
        with _FlopCounter() as counter:
            F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=gqa)
        counts.append(counter.total)
    assert counts[0] == counts[1] == 4 * 4 * 8 * 8 * 16


def test_flop_counter_counts_in_place_matmuls():
    """torch's chunked fused cross-entropy accumulates a trainable head's gradient with ``addmm_``, which has no
    FLOP formula of its own: it was counted as 0, so fused variants of a full fine-tune showed 2 N h V FLOPs fewer
    than they run (``compare``'s summary then claimed a FLOP saving that does not exist)."""
    from lopt_kernels.measure import _FlopCounter
    from lopt_kernels.ops.linear_cross_entropy import linear_cross_entropy

    acc, a, b = torch.zeros(5, 7), torch.randn(5, 3), torch.randn(3, 7)
    with _FlopCounter() as counter:
        acc.addmm_(a, b)
    assert counter.total == 2 * 5 * 3 * 7
    n, h, v = 64, 16, 40
    hidden = torch.randn(1, n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (1, n))
    with _FlopCounter() as plain:
        torch.nn.functional.cross_entropy((hidden @ weight.t()).view(-1, v), labels.view(-1)).backward()
    for impl in ("torch", "chunked"):
        with _FlopCounter() as fused:
            linear_cross_entropy(hidden, weight, labels, impl=impl).backward()
        assert fused.total == plain.total == 6 * n * h * v, impl
