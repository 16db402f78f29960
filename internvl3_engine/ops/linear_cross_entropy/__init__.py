"""Fused linear cross-entropy of the LLM head: chunked over tokens, never materialising the [T, V] logits."""

from .op import (
    LINEAR_CROSS_ENTROPY,
    LINEAR_CROSS_ENTROPY_BACKWARD,
    LINEAR_CROSS_ENTROPY_WITH_GRADS,
    default_chunk_size,
    linear_cross_entropy,
)
from .reference import (
    linear_cross_entropy_backward_reference,
    linear_cross_entropy_reference,
    linear_cross_entropy_with_grads_reference,
)

__all__ = [
    "LINEAR_CROSS_ENTROPY",
    "LINEAR_CROSS_ENTROPY_BACKWARD",
    "LINEAR_CROSS_ENTROPY_WITH_GRADS",
    "default_chunk_size",
    "linear_cross_entropy",
    "linear_cross_entropy_backward_reference",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_with_grads_reference",
]
