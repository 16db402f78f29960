"""Plain PyTorch reference of loss_weights: the executable spec every backend is tested against."""

from __future__ import annotations

import torch

MODES = ("token", "sample", "square")
# Codes of the modes in the kernels (the Mode enum of csrc/loss_weights/loss_weights_math.h).
MODE_CODES = {mode: code for code, mode in enumerate(MODES)}


def loss_weights_reference(labels: torch.Tensor, cu_seqlens: torch.Tensor, mode: str = "square", ignore_index: int = -100) -> torch.Tensor:
    """float32 [T] per-token loss weights of a packed batch (segments given by int32 ``cu_seqlens``).

    With x the number of supervised tokens (labels != ignore_index) of a token's segment: 'token' w = 1,
    'sample' w = 1/x, 'square' w = 1/sqrt(x); unsupervised tokens get 0. x is an exact count converted to
    float32, and 1/x, sqrt(x), 1/sqrt(x) are each one correctly rounded float32 operation (torch.sqrt is
    not one on CPU: see sqrt_rn).
    """
    supervised = labels != ignore_index
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    prefix = torch.cat([supervised.new_zeros(1, dtype=torch.int64), torch.cumsum(supervised, 0, dtype=torch.int64)])
    counts = prefix[cu_seqlens[1:].long()] - prefix[cu_seqlens[:-1].long()]
    x = torch.repeat_interleave(counts, lengths, output_size=labels.shape[0]).to(torch.float32).clamp(min=1)
    w = count_weights(x, mode)
    return torch.where(supervised, w, torch.zeros_like(w))


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root of float32 ``x`` >= 0 (IEEE sqrt, as sqrtf, Triton's
    tl.sqrt_rn and CUDA's __fsqrt_rn compute it), on every device.

    torch.sqrt is not that on CPU: with MKL, ATen's CPU sqrt calls MKL VML's vsSqrt/vdSqrt (ATen/cpu/vml.h),
    which are within 1 ulp but not correctly rounded, in float32 (sqrt(19) gives 4.3588986 instead of
    4.3588991) and in float64. So the root is taken in float64 and rounded once to float32: for a float32
    x the exact root is at least 4 float64 ulps away from every midpoint of two adjacent float32 values
    (with r = sqrt(x) in [2^a, 2^(a+1)) and a midpoint m = K 2^(a-24), K odd: x - m^2 is a nonzero
    multiple of 2^(2a-48), so |r - m| = |x - m^2| / (r + m) >= 2^(a-50)), so any float64 root less than
    4 ulps off (VML's is within 1) rounds to the float32 value nearest the exact root: sqrtf's."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def count_weights(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The weight of each supervised token of a segment with float32 count ``x`` >= 1: 1, 1/x or 1/sqrt(x),
    each operation one correctly rounded float32 operation (as the C++, CUDA and Triton kernels do)."""
    ones = torch.ones_like(x)
    if mode == "token":
        return ones
    if mode == "sample":
        return torch.div(ones, x)  # an ATen binary op: IEEE float32 division on CPU and CUDA
    return torch.div(ones, sqrt_rn(x))
