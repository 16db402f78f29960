"""Packing helpers: cu_seqlens and max_seqlen for a pack of variable-length sequences.

max_seqlen is computed once per batch on the host, where the lengths already are, so the layers that
need it (attention) never synchronise with the device to read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .validation import check_cu_seqlens_meta, check_cu_seqlens_values, check_int


@dataclass(frozen=True)
class PackedSequences:
    """Boundaries of a pack: ``cu_seqlens`` int32 [B+1] on the target device, ``max_seqlen`` and
    ``total_tokens`` as host ints (computed once, read by every layer without a device sync)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    total_tokens: int

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1


def _host_lengths(lengths) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        values = [int(v) for v in lengths.tolist()]
    elif isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        values = [check_int(f"lengths[{i}]", v) for i, v in enumerate(lengths)]
    else:
        raise TypeError(f"lengths must be a sequence of ints or a 1-D integer tensor, got {type(lengths).__name__}")
    for i, v in enumerate(values):
        if v < 0:
            raise ValueError(f"lengths must be non-negative, got lengths[{i}] = {v}")
    if sum(values) >= 2**31:
        raise ValueError(f"lengths must sum to less than 2**31 (int32 cu_seqlens), got {sum(values)}")
    return values


def cu_seqlens_from_lengths(lengths, device: torch.device | str | None = None) -> torch.Tensor:
    """int32 [B+1] cumulative boundaries (0, l0, l0+l1, ...) of sequences of the given lengths."""
    values = _host_lengths(lengths)
    boundaries = [0]
    for v in values:
        boundaries.append(boundaries[-1] + v)
    return torch.tensor(boundaries, dtype=torch.int32, device=device)


def max_seqlen(cu_seqlens) -> int:
    """Length of the longest sequence of a pack (0 for an empty pack). Reads cu_seqlens on the host:
    call it once per batch, where the batch is built, not per layer."""
    check_cu_seqlens_meta(cu_seqlens, cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None)
    # Checked: a decreasing cu_seqlens would otherwise give a silently wrong answer.
    return check_cu_seqlens_values(cu_seqlens, int(cu_seqlens[-1]))


def pack_lengths(lengths, device: torch.device | str | None = None) -> PackedSequences:
    """cu_seqlens on ``device`` with max_seqlen and total_tokens taken from the host lengths."""
    values = _host_lengths(lengths)
    return PackedSequences(
        cu_seqlens=cu_seqlens_from_lengths(values, device=device),
        max_seqlen=max(values, default=0),
        total_tokens=sum(values),
    )
