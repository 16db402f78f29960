"""torch.autocast for the engine's matmul ops.

Custom ops are on none of autocast's lists, so under ``torch.autocast`` a float32 input would reach a kernel
as float32 (a float32 LM head on a bf16 run) or meet bf16 inputs in one call. The public wrappers of the
ops built on matmuls (v2pe_attention, linear_cross_entropy) cast their floating inputs as autocast casts
nn.Linear's and SDPA's: to the autocast dtype, float64 left alone; gradients flow back in the inputs' dtypes.
The op then runs with autocast off (kernels_at_input_dtype), so that every backend, the PyTorch reference
included, computes at the dtype it was given, as a fused kernel does.
"""

from __future__ import annotations

import contextlib

import torch

_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_inputs(*tensors):
    """``tensors`` cast to the autocast dtype of their device when autocast is on there; otherwise (and for
    None, non-tensors and float64) unchanged. Returns a tuple in the same order."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    if device is None or not _autocast_on(device):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CAST_DTYPES else t for t in tensors)


def _autocast_on(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        # Traced tensors sit on real devices; torch 2.11's dynamo cannot trace is_autocast_available.
        return torch.is_autocast_enabled(device.type)
    # Devices autocast does not know (meta) have it off.
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def kernels_at_input_dtype(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on ``device``'s type (nothing to do where it is off already)."""
    return torch.autocast(device.type, enabled=False) if _autocast_on(device) else contextlib.nullcontext()
