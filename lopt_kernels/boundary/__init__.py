"""The LoPT gradient boundary, one module per mode, sharing ``common``.

- ``eager``: the block learns during the forward (its local backward runs as soon as its forward
  ends); nothing is recomputed, the local gradients are held until the caller's backward scales them.
- ``activation_free``: the block runs forward without a graph and is rebuilt in the caller's backward.
- ``stored``: the reference's behaviour, every activation kept for one ordinary backward.

Each module has one ``BoundaryMode`` class, the hooks' only way in; ``BOUNDARY_MODES`` maps ``mode=`` to it.
"""

from . import activation_free, eager, stored
from .common import BoundaryMode, BoundarySpec, hidden_of, local_loss_and_grads

BOUNDARY_MODES = {mode.name: mode for mode in (eager.EagerMode, activation_free.ActivationFreeMode, stored.StoredMode)}

__all__ = ["BOUNDARY_MODES", "BoundaryMode", "BoundarySpec", "activation_free", "eager", "hidden_of",
           "local_loss_and_grads", "stored"]
