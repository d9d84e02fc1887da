"""lopt_kernels: LoPT (local-learning post-training) for Hugging Face causal LMs, with fused kernels.

    import lopt_kernels
    lopt_kernels.patch(model)          # then train with any trainer: loss = task + lambda_aux * aux
"""

from .aux_decoder import AuxDecoder
from .patching import LoptPatchError, aux_decoders, is_patched, param_groups, patch, unpatch

__version__ = "0.1.0"


def __getattr__(name):
    # The trainer integration imports transformers' Trainer machinery (seconds): load it on first use.
    if name in ("attach", "LoptCallback", "integrations"):
        import importlib  # noqa: PLC0415

        integrations = importlib.import_module(f"{__name__}.integrations")  # not ``from .``: that recurses here
        return integrations if name == "integrations" else getattr(integrations, name)
    raise AttributeError(f"module 'lopt_kernels' has no attribute {name!r}")

__all__ = [
    "AuxDecoder",
    "LoptCallback",
    "LoptPatchError",
    "attach",
    "aux_decoders",
    "is_patched",
    "param_groups",
    "patch",
    "unpatch",
    "__version__",
]
