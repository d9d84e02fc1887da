"""Kernels and their autograd Functions, one module per op; nothing here imports transformers.

- ``reconstruction_loss``: the aux decoder's fused reconstruction loss (Triton + chunked PyTorch twin).
- ``linear_cross_entropy``: the task loss without logits (Liger-Kernel on CUDA, a chunked PyTorch loop elsewhere).

Nothing is re-exported here: ``lopt_kernels.ops.reconstruction_loss`` is the op's package, whose ``__init__``
exports its public functions.
"""
