"""Input checks shared by the public ops.

Metadata checks (type, dtype, shape, device) run in the public wrappers, so they also hold while
torch.compile traces with fake tensors. Value checks that need the data (cu_seqlens contents) run inside
the op implementations, on real tensors. Bad dtypes raise TypeError, bad shapes or values ValueError, and
every message names the argument.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
T = TypeVar("T")


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor with one of ``dtypes``, ``ndim`` dimensions, on ``device``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {value.device}")
    return value


def check_length(name: str, value: torch.Tensor, expected: int, what: str) -> None:
    if value.shape[0] != expected:
        raise ValueError(f"{name} must have {expected} rows ({what}), got {value.shape[0]}")


def check_cu_seqlens_meta(cu_seqlens, device: torch.device) -> torch.Tensor:
    """cu_seqlens is an int32 1-D tensor with at least one entry, on ``device``."""
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, device=device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have at least one entry (0), got an empty tensor")
    return cu_seqlens


def remembered(tensor: torch.Tensor, name: str, key, compute: Callable[[], T]) -> T:
    """``compute()``, remembered on ``tensor`` (as attribute ``name``) with the tensor's version counter (bumped
    by every in-place change) and ``key``: a check that reads a tensor's values costs a host synchronisation on
    a GPU, and this runs it once per contents instead of once per call (the layers sharing one pack's
    cu_seqlens, the forward and backward of one batch's visual mask). Inference tensors (made under
    torch.inference_mode) have no version counter: their checks run on every call."""
    if tensor.is_inference():
        return compute()
    stamp = (tensor._version, key)
    memo = getattr(tensor, name, None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    value = compute()
    setattr(tensor, name, (stamp, value))
    return value


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int) -> int:
    """cu_seqlens starts at 0, never decreases and ends at ``total``; returns the longest segment.

    Reading the values costs a host synchronisation on a GPU; the result is remembered on the tensor
    (``remembered``), so the layers of a model that share one pack's cu_seqlens read it once per pack.
    """
    return remembered(cu_seqlens, "_internvl3_engine_checked", total, lambda: _cu_seqlens_longest(cu_seqlens, total))


def _cu_seqlens_longest(cu_seqlens: torch.Tensor, total: int) -> int:
    values = cu_seqlens.detach().cpu()
    if int(values[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(values[0])}")
    if values.numel() > 1 and bool((values[1:] < values[:-1]).any()):
        where = int(torch.nonzero(values[1:] < values[:-1])[0, 0])
        raise ValueError(
            f"cu_seqlens must never decrease, got {int(values[where])} then {int(values[where + 1])} at index {where}"
        )
    if int(values[-1]) != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens {total}, got {int(values[-1])}")
    return int((values[1:] - values[:-1]).max()) if values.numel() > 1 else 0


def check_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value
