"""internvl3_engine: kernels and a parallelism scheduler for training InternVL3-style multimodal LLMs."""

from .dispatch import BACKENDS, backend, get_backend, set_backend
from .info import info
from .ops.attention import v2pe_attention, v2pe_attention_with_lse
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.loss_weights import loss_weights
from .ops.pixel_unshuffle import pixel_unshuffle, pixel_unshuffle_layernorm
from .ops.rotary import apply_rotary, rotary_inv_freq
from .ops.scatter_visual import scatter_visual
from .ops.v2pe_positions import v2pe_position_ids
from .packing import PackedSequences, cu_seqlens_from_lengths, max_seqlen, pack_lengths
from .version import __version__

__all__ = [
    "BACKENDS",
    "PackedSequences",
    "__version__",
    "apply_rotary",
    "backend",
    "cu_seqlens_from_lengths",
    "get_backend",
    "info",
    "linear_cross_entropy",
    "loss_weights",
    "max_seqlen",
    "pack_lengths",
    "pixel_unshuffle",
    "pixel_unshuffle_layernorm",
    "rotary_inv_freq",
    "scatter_visual",
    "set_backend",
    "v2pe_attention",
    "v2pe_attention_with_lse",
    "v2pe_position_ids",
]
