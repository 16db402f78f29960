"""Triton kernels of scatter_visual: one program per token row, the row moved in BLOCK_C-wide vectors.
The visual row of token t is visual_before[t], the exclusive prefix sum of is_visual computed by the op."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest column block one program moves at once; wider rows loop (8192 covers the usual LLM widths).
MAX_BLOCK_C = 8192


@triton.jit
def _program_token(is_visual_ptr, visual_before_ptr, num_visual, BLOCK_C: tl.constexpr):
    """(the program's token t as int64, the visual row it takes or -1 when it keeps its text row, the column
    offsets of a block). The visual row is bound-checked against num_visual."""
    t = tl.program_id(0).to(tl.int64)
    visual_before = tl.load(visual_before_ptr + t)
    take = (tl.load(is_visual_ptr + t) != 0) & (visual_before >= 0) & (visual_before < num_visual)
    return t, tl.where(take, visual_before, -1), tl.arange(0, BLOCK_C)


@triton.jit
def _scatter_visual_kernel(
    text_ptr, visual_ptr, out_ptr, is_visual_ptr, visual_before_ptr,
    num_visual, width,
    BLOCK_C: tl.constexpr,
):
    t, j, cols = _program_token(is_visual_ptr, visual_before_ptr, num_visual, BLOCK_C)
    for start in range(0, width, BLOCK_C):
        mask = start + cols < width
        if j >= 0:
            row = tl.load(visual_ptr + j * width + start + cols, mask=mask)
        else:
            row = tl.load(text_ptr + t * width + start + cols, mask=mask)
        tl.store(out_ptr + t * width + start + cols, row, mask=mask)


@triton.jit
def _scatter_visual_backward_kernel(
    grad_ptr, grad_text_ptr, grad_visual_ptr, is_visual_ptr, visual_before_ptr,
    num_visual, width,
    BLOCK_C: tl.constexpr,
):
    t, j, cols = _program_token(is_visual_ptr, visual_before_ptr, num_visual, BLOCK_C)
    for start in range(0, width, BLOCK_C):
        mask = start + cols < width
        row = tl.load(grad_ptr + t * width + start + cols, mask=mask)
        if j >= 0:
            tl.store(grad_visual_ptr + j * width + start + cols, row, mask=mask)
            tl.store(grad_text_ptr + t * width + start + cols, tl.zeros_like(row), mask=mask)
        else:
            tl.store(grad_text_ptr + t * width + start + cols, row, mask=mask)


def _launch_config(width: int, element_size: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(width, 1)), MAX_BLOCK_C)
    # Enough warps that each thread moves about two 16-byte vectors of the block (at most 8 warps).
    num_warps = max(1, min(8, block_c * element_size // (16 * 32 * 2)))
    return block_c, num_warps


def scatter_visual_triton(text: torch.Tensor, visual: torch.Tensor, is_visual: torch.Tensor, visual_before: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(text)
    tokens, width = text.shape
    if out.numel() == 0:
        return out
    block_c, num_warps = _launch_config(width, text.element_size())
    _scatter_visual_kernel[(tokens,)](
        text, visual, out, is_visual.view(torch.uint8), visual_before,
        visual.shape[0], width,
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def scatter_visual_backward_triton(
    grad: torch.Tensor, is_visual: torch.Tensor, visual_before: torch.Tensor, num_visual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, width = grad.shape
    grad_text = torch.empty_like(grad)
    # Every row of grad_visual is written exactly once when the visual count equals num_visual (the op checks).
    grad_visual = grad.new_empty(num_visual, width)
    if grad.numel() == 0:
        return grad_text, grad_visual
    block_c, num_warps = _launch_config(width, grad.element_size())
    _scatter_visual_backward_kernel[(tokens,)](
        grad, grad_text, grad_visual, is_visual.view(torch.uint8), visual_before,
        num_visual, width,
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return grad_text, grad_visual
