"""The machine's ceilings, measured in the same run as the kernels: copy bandwidth and matmul throughput."""

from __future__ import annotations

import torch

from internvl3_engine.planner.hardware import datasheet_bf16_flops, device_pattern

from .harness import Timer, gb_per_s, nbytes

# GPU: a 1 GiB bf16 copy (far beyond L2) and the 8192^3 bf16 matmul of performance-anchors.md.
# CPU: sizes that finish in well under a second (a smoke test).
GPU_COPY_BYTES, CPU_COPY_BYTES = 2**30, 64 * 2**20
GPU_MATMUL, CPU_MATMUL = (8192, torch.bfloat16), (1024, torch.float32)


def copy_ceiling(device: torch.device, timer: Timer) -> dict:
    """Device-to-device copy of a large random tensor; bandwidth counts bytes read plus bytes written."""
    size = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    source = torch.randn(size // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    median_ms = timer.median_ms(lambda: target.copy_(source))
    moved = 2 * nbytes(source)
    return {"bytes": moved, "median_ms": median_ms, "gb_per_s": gb_per_s(moved, median_ms)}


def matmul_ceiling(device: torch.device, timer: Timer) -> dict:
    """n x n x n matmul of random inputs; 2 n^3 FLOPs."""
    n, dtype = GPU_MATMUL if device.type == "cuda" else CPU_MATMUL
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    median_ms = timer.median_ms(lambda: torch.matmul(a, b, out=out))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": median_ms,
            "tflop_per_s": 2 * n**3 / (median_ms * 1e-3) / 1e12}


def datasheet_ceiling(info: dict) -> dict | None:
    """The datasheet's dense bf16 peak for this device (from NVML's name, else torch's; the table is
    internvl3_engine.planner.hardware's), None when unknown."""
    name = info.get("nvml_name") or info.get("name") or ""
    pattern = device_pattern(name) if info.get("type") == "cuda" else None
    if pattern is None:
        return None
    return {"device_name": name, "matched": pattern, "dtype": "bfloat16", "tflop_per_s": datasheet_bf16_flops(name) / 1e12}


def measure_ceilings(device: torch.device, timer: Timer, info: dict) -> dict:
    """Copy and matmul ceilings measured now, plus the datasheet's bf16 peak (None when not known)."""
    return {"copy": copy_ceiling(device, timer), "matmul": matmul_ceiling(device, timer),
            "datasheet": datasheet_ceiling(info)}
