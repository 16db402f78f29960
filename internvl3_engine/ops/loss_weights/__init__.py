"""Per-token loss weights of InternVL's loss reductions (token, sample, square averaging)."""

from .op import LOSS_WEIGHTS, loss_weights
from .reference import MODES, loss_weights_reference

__all__ = ["LOSS_WEIGHTS", "MODES", "loss_weights", "loss_weights_reference"]
