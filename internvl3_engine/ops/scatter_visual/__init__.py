"""Placement of the projected image rows over the <IMG_CONTEXT> token embeddings."""

from .op import SCATTER_VISUAL, SCATTER_VISUAL_BACKWARD, scatter_visual
from .reference import scatter_visual_backward_reference, scatter_visual_reference

__all__ = [
    "SCATTER_VISUAL",
    "SCATTER_VISUAL_BACKWARD",
    "scatter_visual",
    "scatter_visual_backward_reference",
    "scatter_visual_reference",
]
