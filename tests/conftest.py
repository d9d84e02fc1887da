import os

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Every test that patches with the default mode runs once per way the bottom blocks can learn: the
# default "auto" resolves to one of these, and on tiny full-fine-tune models it would always pick
# activation-free. Kernel tests (tests/ops) do not patch models.
DEFAULT_MODES = ("eager", "activation_free")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("explicit_modes"):
        return  # the test names its modes itself
    if "lopt_default_mode" in metafunc.fixturenames and "ops" not in metafunc.definition.path.parts:
        metafunc.parametrize("lopt_default_mode", DEFAULT_MODES, indirect=True)


@pytest.fixture(autouse=True)
def lopt_default_mode(request, monkeypatch):
    """The mode ``lopt_kernels.patch`` uses when none is passed (also for subprocesses, via the env)."""
    import lopt_kernels.patching  # noqa: PLC0415

    mode = getattr(request, "param", "auto")
    monkeypatch.setitem(lopt_kernels.patching.patch.__kwdefaults__, "mode", mode)
    monkeypatch.setenv("LOPT_TEST_DEFAULT_MODE", mode)
    return mode


@pytest.fixture(params=["default", "stored"])
def mode(request, lopt_default_mode):
    """Every boundary mode once: the conftest's two default modes, and stored (run under one of them)."""
    if request.param == "default":
        return lopt_default_mode
    if lopt_default_mode != "eager":
        pytest.skip("mode='stored' runs once, alongside the eager default")
    return "stored"
