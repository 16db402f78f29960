"""Rotary position embedding at float (V2PE) positions."""

from .op import ROTARY, apply_rotary
from .reference import rotary_inv_freq, rotary_reference

__all__ = ["ROTARY", "apply_rotary", "rotary_inv_freq", "rotary_reference"]
