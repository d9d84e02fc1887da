"""lopt_kernels: LoPT (local-learning post-training) for Hugging Face causal LMs, with fused kernels.

    import lopt_kernels
    lopt_kernels.patch(model)          # then train with any trainer: loss = task + lambda_aux * aux
"""

from .aux_decoder import AuxDecoder
from .patching import LoptPatchError, aux_decoders, is_patched, param_groups, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "AuxDecoder",
    "LoptPatchError",
    "aux_decoders",
    "is_patched",
    "param_groups",
    "patch",
    "unpatch",
    "__version__",
]
