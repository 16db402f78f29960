"""Plain PyTorch reference of apply_rotary: the executable spec every backend is tested against."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def rotary_inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """float32 [rotary_dim/2]: inv_freq_i = theta^(-2i/rotary_dim), computed in float64 and rounded once,
    so that every backend multiplies the same float32 frequencies."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (1.0 / theta**exponents).to(torch.float32).to(device)


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Qwen2 half-split rotary of x [T, H, D] by float32 positions [T].

    angle[t, i] = positions[t] * inv_freq[i] in float32 (never from rounded or integer positions);
    (x1, x2) = (x[..., i], x[..., i + R/2]) becomes (x1 cos - x2 sin, x2 cos + x1 sin) for i < R/2 with
    R = 2 * len(inv_freq); dims R.. pass through. ``inverse`` rotates by -angle (the backward).
    Arithmetic is float32, or float64 for float64 inputs.
    """
    half = inv_freq.shape[0]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    cos = angles.to(compute).cos()[:, None, :]
    sin = angles.to(compute).sin()[:, None, :]
    if inverse:
        sin = -sin
    x1 = x[..., :half].to(compute)
    x2 = x[..., half : 2 * half].to(compute)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)
