"""Triton kernel of loss_weights: one program per segment, looping over it in blocks twice (count the
supervised tokens, then write the weights). tl.sqrt_rn and tl.div_rn are correctly rounded, so the weights
equal the other backends' bit for bit (tl.sqrt and '/' are approximate)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import MODE_CODES

BLOCK = 1024


@triton.jit
def _loss_weights_kernel(labels_ptr, cu_seqlens_ptr, weights_ptr, tokens, ignore_index, MODE: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    # Bound-checked against the label count: values are checked by the op, not trusted here.
    start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + s).to(tl.int64), 0), tokens)
    stop = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + s + 1).to(tl.int64), start), tokens)
    offsets = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    for block_start in range(start, stop, BLOCK):
        t = block_start + offsets
        labels = tl.load(labels_ptr + t, mask=t < stop, other=0).to(tl.int64)
        count += ((labels != ignore_index) & (t < stop)).to(tl.int64)
    # A segment without supervised tokens writes only zeros; max(x, 1) keeps its unused weight finite.
    x = tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    if MODE == 1:
        w = tl.div_rn(1.0, x)
    elif MODE == 2:
        w = tl.div_rn(1.0, tl.sqrt_rn(x))
    else:
        w = 1.0
    for block_start in range(start, stop, BLOCK):
        t = block_start + offsets
        labels = tl.load(labels_ptr + t, mask=t < stop, other=0).to(tl.int64)
        tl.store(weights_ptr + t, tl.where(labels != ignore_index, w, 0.0), mask=t < stop)


def loss_weights_triton(labels: torch.Tensor, cu_seqlens: torch.Tensor, mode: str, ignore_index: int) -> torch.Tensor:
    tokens = labels.shape[0]
    # Zeros: a segment's tokens are all written, but inconsistent direct calls may leave some uncovered.
    weights = torch.zeros(tokens, dtype=torch.float32, device=labels.device)
    segments = cu_seqlens.shape[0] - 1
    if tokens == 0 or segments == 0:
        return weights
    _loss_weights_kernel[(segments,)](labels, cu_seqlens, weights, tokens, ignore_index, MODE=MODE_CODES[mode], BLOCK=BLOCK)
    return weights
