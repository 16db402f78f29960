"""Triton kernel of apply_rotary: each program rotates BLOCK_T tokens, all heads, computing the
cos/sin of its tokens once and reusing them across heads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, positions_ptr, inv_freq_ptr,
    num_tokens, num_heads, head_dim, half,
    INVERSE: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_REST: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pairs = tl.arange(0, BLOCK_HALF)
    token_ok = tokens < num_tokens
    pair_ok = pairs < half
    position = tl.load(positions_ptr + tokens, mask=token_ok, other=0.0)
    freq = tl.load(inv_freq_ptr + pairs, mask=pair_ok, other=0.0)
    angle = position[:, None] * freq[None, :]  # float32, as the spec requires
    cos = tl.cos(angle.to(COMPUTE))
    sin = tl.sin(angle.to(COMPUTE))
    if INVERSE:
        sin = -sin
    mask = token_ok[:, None] & pair_ok[None, :]
    rest = tl.arange(0, BLOCK_REST)
    rest_mask = token_ok[:, None] & (rest < head_dim - 2 * half)[None, :]
    row = tokens.to(tl.int64)[:, None] * num_heads * head_dim
    for h in range(num_heads):
        base = row + h * head_dim
        x1 = tl.load(x_ptr + base + pairs[None, :], mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(x_ptr + base + half + pairs[None, :], mask=mask, other=0.0).to(COMPUTE)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        tl.store(out_ptr + base + pairs[None, :], y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + half + pairs[None, :], y2.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_REST:
            passthrough = tl.load(x_ptr + base + 2 * half + rest[None, :], mask=rest_mask, other=0.0)
            tl.store(out_ptr + base + 2 * half + rest[None, :], passthrough, mask=rest_mask)


def rotary_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    out = torch.empty_like(x)
    tokens, heads, head_dim = x.shape
    half = inv_freq.shape[0]
    if x.numel() == 0:
        return out
    block_t = 16
    rest = head_dim - 2 * half
    _rotary_kernel[(triton.cdiv(tokens, block_t),)](
        x, out, positions, inv_freq,
        tokens, heads, head_dim, half,
        INVERSE=inverse,
        COMPUTE=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK_T=block_t,
        BLOCK_HALF=triton.next_power_of_2(half),
        HAS_REST=rest > 0,
        BLOCK_REST=triton.next_power_of_2(max(rest, 1)),
    )
    return out
