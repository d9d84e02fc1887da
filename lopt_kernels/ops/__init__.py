"""Kernels and their autograd Functions, one module per op; nothing here imports transformers.

- ``reconstruction_loss``: the aux decoder's fused reconstruction loss (Triton + chunked PyTorch twin).
- ``linear_cross_entropy``: the task loss without logits (dispatch to Liger-Kernel / torch).

The modules are not re-exported here, so ``lopt_kernels.ops.reconstruction_loss`` stays the module.
"""
