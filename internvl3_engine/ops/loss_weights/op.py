"""loss_weights: validation, backend dispatch, and the torch.library operator (no gradient: integer inputs)."""

from __future__ import annotations

import torch

from ... import extension
from ...dispatch import KernelSet
from ...validation import check_cu_seqlens_meta, check_cu_seqlens_values, check_int, check_tensor
from ..library import operator
from .reference import MODE_CODES, MODES, loss_weights_reference

_INT64_RANGE = (-(2**63), 2**63 - 1)


def _loss_weights_triton(labels, cu_seqlens, mode, ignore_index):
    from .triton_kernel import loss_weights_triton  # imported on first use (see KernelSet)

    return loss_weights_triton(labels, cu_seqlens, mode, ignore_index)


def _loss_weights_compiled(labels, cu_seqlens, mode, ignore_index):
    # The compiled schema takes the mode as an integer code.
    return extension.loss_weights(labels, cu_seqlens, MODE_CODES[mode], ignore_index)


LOSS_WEIGHTS = KernelSet("loss_weights", torch=loss_weights_reference, triton=_loss_weights_triton, cuda=_loss_weights_compiled)


def _loss_weights_fake(labels, cu_seqlens, mode, ignore_index):
    return labels.new_empty(labels.shape, dtype=torch.float32)


@operator("loss_weights", fake=_loss_weights_fake)
def loss_weights_op(labels: torch.Tensor, cu_seqlens: torch.Tensor, mode: str, ignore_index: int) -> torch.Tensor:
    check_cu_seqlens_values(cu_seqlens, labels.shape[0])
    return LOSS_WEIGHTS.select(labels.device)(labels, cu_seqlens, mode, ignore_index)


def loss_weights(labels: torch.Tensor, cu_seqlens: torch.Tensor, mode: str = "square", ignore_index: int = -100) -> torch.Tensor:
    """float32 [T] per-token loss weights of a packed batch, InternVL's loss reductions.

    ``labels`` int64 or int32 [T]; ``cu_seqlens`` int32 [B+1] marks the samples (starts at 0, never
    decreases, ends at T; checked on the values: one host sync). With x the number of supervised tokens
    (labels != ignore_index) of a token's sample: mode 'token' w = 1, 'sample' w = 1/x, 'square'
    (InternVL3's default) w = 1/sqrt(x); unsupervised tokens get 0. The loss is then
    sum(w * CE) / sum(w). Every backend returns the same bits (correctly rounded float32 sqrt and division).
    """
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), ndim=1)
    check_cu_seqlens_meta(cu_seqlens, labels.device)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {MODES}, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ignore_index = check_int("ignore_index", ignore_index)
    if not _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return loss_weights_op(labels.contiguous(), cu_seqlens.contiguous(), mode, ignore_index)
