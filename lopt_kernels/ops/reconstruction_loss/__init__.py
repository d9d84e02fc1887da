"""Fused reconstruction loss of an LoPT aux decoder, forward and backward.

The op computes, for rows ``y`` (the block output) and targets ``x`` (the block input),

    loss = mean((up(gelu(down(layer_norm(y)))) - x) ** 2)        (fp32 scalar)

and, in the same pass, the gradients of ``grad_scale * loss`` with respect to ``y`` and the six
decoder parameters. Rows are processed in chunks: neither the fp32 reconstruction nor its
gradient ever exists for all rows at once; weight gradients accumulate in fp32.

Two implementations share one chunked algorithm:
- ``"torch"``: chunked PyTorch, used on CPU tensors and as the kernels' fast twin;
- ``"triton"``: Triton kernels for the row-wise parts (LayerNorm + statistics, GELU, the squared
  error and its gradient, the LayerNorm backward) around cuBLAS matmuls.

Midpoint capture: the tensor handed to the top half of the model at the split point is a zero-copy
view of the block output (no clone, no ``.contiguous()``), and this op receives ``y`` as that same
storage: the kernels accept arbitrary row/column strides for ``y`` and ``x``, so the LayerNorm-forward
kernel's single read of each chunk of ``y`` is the only extra read of ``y`` the loss costs.

Both implementations are registered as ``torch.library`` custom ops (``lopt_kernels::reconstruction_loss``
for the loss only, ``lopt_kernels::reconstruction_loss_and_grads`` for the loss and the seven gradients)
with fake (meta) implementations, so ``torch.compile`` and ``FakeTensorMode`` treat the op as opaque.

Layout: ``checks`` (inputs, backend, chunk size), ``request`` (``LossRequest``: one call as every implementation
receives it), ``torch_twin`` (the chunked PyTorch implementation), ``kernels`` (the Triton row kernels),
``gemm_kernels`` (Triton GEMMs with the row-wise work in their epilogues), ``triton_driver`` (the Triton backend's
host code, both matmul paths), ``custom_op`` (the ``torch.library`` registration: the only flat argument list),
``api`` (the functions and the autograd Function re-exported here).
"""

from .api import ReconstructionLossFunction, reconstruction_loss, reconstruction_loss_and_grads
from .checks import check_reconstruction_inputs, check_row_mask, default_chunk_rows, resolve_backend

__all__ = [
    "reconstruction_loss",
    "reconstruction_loss_and_grads",
    "check_reconstruction_inputs",
    "check_row_mask",
    "resolve_backend",
    "default_chunk_rows",
    "ReconstructionLossFunction",
]
