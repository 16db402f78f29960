"""Plain PyTorch reference of scatter_visual: the executable spec every backend is tested against."""

from __future__ import annotations

import torch


def scatter_visual_reference(text_embeds: torch.Tensor, visual_embeds: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    """text_embeds [T, C] with its visual rows (is_visual [T] True) replaced, in order, by the rows of
    visual_embeds [V, C]: the j-th visual token (counting from 0) takes visual_embeds[j]. Needs V equal to
    the number of visual tokens."""
    out = text_embeds.clone()
    out[is_visual] = visual_embeds
    return out


def scatter_visual_backward_reference(grad: torch.Tensor, is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_text, grad_visual): grad with its visual rows zeroed, and the visual rows of grad in order."""
    return grad.masked_fill(is_visual[:, None], 0), grad[is_visual]
