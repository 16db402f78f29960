"""Fused V2PE-rotary variable-length attention with GQA (FlashAttention-2 manner, Triton)."""

from .op import ROTARY_MODES, V2PE_ATTENTION, V2PE_ATTENTION_BACKWARD, v2pe_attention, v2pe_attention_with_lse
from .reference import v2pe_attention_backward_reference, v2pe_attention_reference

__all__ = [
    "ROTARY_MODES",
    "V2PE_ATTENTION",
    "V2PE_ATTENTION_BACKWARD",
    "v2pe_attention",
    "v2pe_attention_backward_reference",
    "v2pe_attention_reference",
    "v2pe_attention_with_lse",
]
