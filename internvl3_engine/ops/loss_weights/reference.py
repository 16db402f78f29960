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
    float32, and 1/x, sqrt(x), 1/sqrt(x) are each one correctly rounded float32 operation.
    """
    supervised = labels != ignore_index
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    prefix = torch.cat([supervised.new_zeros(1, dtype=torch.int64), torch.cumsum(supervised, 0, dtype=torch.int64)])
    counts = prefix[cu_seqlens[1:].long()] - prefix[cu_seqlens[:-1].long()]
    x = torch.repeat_interleave(counts, lengths, output_size=labels.shape[0]).to(torch.float32).clamp(min=1)
    ones = torch.ones_like(x)
    if mode == "token":
        w = ones
    elif mode == "sample":
        w = torch.div(ones, x)
    else:
        w = torch.div(ones, torch.sqrt(x))
    return torch.where(supervised, w, torch.zeros_like(w))
