"""The machine's ceilings, measured in the same run as the kernels: copy bandwidth and matmul throughput."""

from __future__ import annotations

import torch

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


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), matched in order against
# the NVML device name (e.g. 'NVIDIA H100 80GB HBM3' is the SXM part).
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def datasheet_ceiling(info: dict) -> dict | None:
    """The datasheet's dense bf16 peak for this device (from NVML's name, else torch's), None when unknown."""
    name = info.get("nvml_name") or info.get("name") or ""
    if info.get("type") != "cuda":
        return None
    for pattern, tflops in DATASHEET_BF16_TFLOPS:
        if pattern in name:
            return {"device_name": name, "matched": pattern, "dtype": "bfloat16", "tflop_per_s": tflops}
    return None


def measure_ceilings(device: torch.device, timer: Timer, info: dict) -> dict:
    """Copy and matmul ceilings measured now, plus the datasheet's bf16 peak (None when not known)."""
    return {"copy": copy_ceiling(device, timer), "matmul": matmul_ceiling(device, timer),
            "datasheet": datasheet_ceiling(info)}
