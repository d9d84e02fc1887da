"""The auxiliary decoder that trains a non-final block through feature reconstruction."""

from __future__ import annotations

import torch
from torch import nn

from .ops.reconstruction_loss import reconstruction_loss

# The decoders' weights in a checkpoint directory (a Trainer checkpoint with attach, a pipeline model directory).
AUX_DECODERS_FILE = "lopt_aux_decoders.safetensors"


class AuxDecoder(nn.Module):
    """``LayerNorm(h) -> Linear(h, r) -> GELU(erf) -> Linear(r, h)`` with ``r = max(h // 4, 1)``.

    Linear weights are Xavier-uniform with gain 0.1, biases zero, LayerNorm at its defaults.
    """

    def __init__(self, hidden_size: int, *, device=None, dtype=None):
        super().__init__()
        bottleneck = max(hidden_size // 4, 1)
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(hidden_size, **factory)
        self.down = nn.Linear(hidden_size, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, hidden_size, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight, gain=0.1)
            nn.init.zeros_(linear.bias)

    @property
    def hidden_size(self) -> int:
        return self.norm.normalized_shape[0]

    def decoder_parameters(self) -> tuple[torch.Tensor, ...]:
        """The six tensors in the order the fused op takes them."""
        return (self.norm.weight, self.norm.bias, self.down.weight, self.down.bias, self.up.weight, self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The reconstruction itself (unfused, in the parameters' dtype)."""
        return self.up(nn.functional.gelu(self.down(self.norm(hidden_states))))

    def reconstruction_loss(self, output: torch.Tensor, target: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """``mean((self(output) - target)**2)`` in fp32 through the fused op; ``target`` gets no gradient."""
        return reconstruction_loss(output, target, *self.decoder_parameters(), eps=self.norm.eps, backend=backend)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bottleneck={self.down.out_features}"
