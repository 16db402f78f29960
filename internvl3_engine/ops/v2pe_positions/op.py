"""v2pe_position_ids: validation, backend dispatch, and the torch.library operator.

There is no Triton kernel: the computation is a sequential scan per segment (each image's end position,
ceil(pos + n * delta), depends on the position before it), which the compiled kernels run with one
thread per segment and the reference runs over images on the host. Its KernelSet prefers the compiled
kernel on CUDA tensors. The output is not differentiable (positions come from token types and deltas),
so the op registers no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import extension
from ...dispatch import KernelSet
from ...validation import check_cu_seqlens_meta, check_cu_seqlens_values, check_tensor
from ..library import operator
from .reference import check_delta_count, v2pe_positions_reference


V2PE_POSITIONS = KernelSet(
    "v2pe_position_ids", torch=v2pe_positions_reference, triton=None, cuda=extension.v2pe_positions, gpu_order=("cuda", "torch")
)


def _delta_out_of_range(value: str) -> ValueError:
    return ValueError(f"delta must be finite and in (0, 1] (V2PE compresses visual positions), got {value}")


def _check_scalar_delta(delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a float or a float32 tensor with one delta per image, got {type(delta).__name__}")
    delta = float(delta)
    if not 0 < delta <= 1:  # NaN fails too
        raise _delta_out_of_range(str(delta))
    return delta


def _v2pe_position_ids_fake(is_visual, cu_seqlens, delta_per_image, delta_scalar):
    return is_visual.new_empty(is_visual.shape, dtype=torch.float32)


@operator("v2pe_position_ids", fake=_v2pe_position_ids_fake)
def v2pe_position_ids_op(
    is_visual: torch.Tensor, cu_seqlens: torch.Tensor, delta_per_image: Optional[torch.Tensor], delta_scalar: float
) -> torch.Tensor:
    check_cu_seqlens_values(cu_seqlens, is_visual.shape[0])
    if delta_per_image is not None:
        bad = ~((delta_per_image > 0) & (delta_per_image <= 1))  # NaN is bad too
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise _delta_out_of_range(f"delta[{first}] = {float(delta_per_image[first])}")
        # Here, not in the kernels: every backend raises the same error before any kernel runs.
        check_delta_count(is_visual, cu_seqlens, delta_per_image)
    else:
        _check_scalar_delta(delta_scalar)
    return V2PE_POSITIONS.select(is_visual.device)(is_visual, cu_seqlens, delta_per_image, delta_scalar)


def v2pe_position_ids(is_visual: torch.Tensor, cu_seqlens: torch.Tensor, delta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """V2PE position ids, float32 [T], of a pack: ``is_visual`` bool [T] marks the visual tokens,
    ``cu_seqlens`` int32 [B+1] the segments (samples).

    Per segment pos starts at -1; a text token takes pos + 1 (and pos becomes that); a maximal run of n
    visual tokens inside a segment is one image (a run crossing a segment boundary is two), whose k-th
    token takes pos + k * delta, after which pos = ceil(pos + n * delta). ``delta`` is a Python float (every
    image) or a float32 tensor [num_images] on is_visual's device (image i, numbered in order of appearance
    across the pack, uses delta[i]); deltas lie in (0, 1]. delta = 1 gives 0..L-1 per segment. Computed in
    float64 and rounded to float32 once per token: every backend gives the same bits. Not differentiable.
    """
    check_tensor("is_visual", is_visual, dtypes=(torch.bool,), ndim=1)
    check_cu_seqlens_meta(cu_seqlens, is_visual.device)
    if isinstance(delta, torch.Tensor):
        check_tensor("delta", delta, dtypes=(torch.float32,), ndim=1, device=is_visual.device)
        return v2pe_position_ids_op(is_visual.contiguous(), cu_seqlens.contiguous(), delta.detach().contiguous(), 1.0)
    return v2pe_position_ids_op(is_visual.contiguous(), cu_seqlens.contiguous(), None, _check_scalar_delta(delta))
