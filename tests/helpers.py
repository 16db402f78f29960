"""Test helpers: the backends present, and FlashAttention's tolerance rule."""

from __future__ import annotations

import torch

from internvl3_engine.dispatch import why_unusable

# Absolute slack added to the 2x rule, per low precision.
SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def backends_for(device: torch.device) -> list[str]:
    """Every backend that can run on ``device`` here ('torch' always)."""
    return [kind for kind in ("torch", "triton", "cuda") if why_unusable(kind, device) is None]


def dtypes_for(device: torch.device, kind: str) -> list[torch.dtype]:
    """Low precisions to test: the Triton interpreter's bfloat16 is broken (triton 3.8), so CPU Triton
    runs float32 and float16; bfloat16 is tested on the GPU."""
    if device.type == "cpu" and kind == "triton":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_fa_close(actual, gold, baseline, *, factor: float = 2.0, what: str = "output") -> None:
    """FlashAttention's rule: the kernel's error against the float64 ``gold`` is at most ``factor`` times
    the error of ``baseline`` (a plain PyTorch implementation in the same precision) plus a small slack."""
    assert actual.shape == gold.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(gold.shape)}"
    assert actual.dtype == baseline.dtype, f"{what}: dtype {actual.dtype} != {baseline.dtype}"
    error = max_error(actual, gold)
    allowed = factor * max_error(baseline, gold) + SLACK[actual.dtype]
    assert error <= allowed, f"{what}: error {error:.3g} > allowed {allowed:.3g} ({factor}x the PyTorch baseline + slack)"
