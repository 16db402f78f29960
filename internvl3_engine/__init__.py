"""internvl3_engine: kernels and a parallelism scheduler for training InternVL3-style multimodal LLMs."""

from .dispatch import BACKENDS, backend, get_backend, set_backend
from .info import info
from .ops.rotary import apply_rotary, rotary_inv_freq
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
    "max_seqlen",
    "pack_lengths",
    "rotary_inv_freq",
    "set_backend",
]
