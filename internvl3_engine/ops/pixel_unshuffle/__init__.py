"""InternVL's pixel unshuffle (ps_version 'v2'), alone and fused with the projector's LayerNorm."""

from .op import PIXEL_UNSHUFFLE, PIXEL_UNSHUFFLE_LAYERNORM, pixel_unshuffle, pixel_unshuffle_layernorm
from .reference import (
    pixel_unshuffle_backward_reference,
    pixel_unshuffle_layernorm_backward_reference,
    pixel_unshuffle_layernorm_reference,
    pixel_unshuffle_reference,
)

__all__ = [
    "PIXEL_UNSHUFFLE",
    "PIXEL_UNSHUFFLE_LAYERNORM",
    "pixel_unshuffle",
    "pixel_unshuffle_backward_reference",
    "pixel_unshuffle_layernorm",
    "pixel_unshuffle_layernorm_backward_reference",
    "pixel_unshuffle_layernorm_reference",
    "pixel_unshuffle_reference",
]
