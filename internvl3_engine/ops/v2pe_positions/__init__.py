"""V2PE (variable visual position encoding) position ids of a packed batch."""

from .op import V2PE_POSITIONS, v2pe_position_ids
from .reference import v2pe_positions_reference

__all__ = ["V2PE_POSITIONS", "v2pe_position_ids", "v2pe_positions_reference"]
