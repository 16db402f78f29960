"""GPU facts the planner's cost model assumes (datasheet figures, per GPU), and the datasheet bf16 peaks
that MFU is measured against.

Bandwidths are per direction, per GPU. The nodes are 8-GPU HGX/DGX boards: NVLink between the GPUs of a
node, and one InfiniBand NIC per GPU across nodes (8 x 400 Gb/s NDR for H100 and H200, 8 x 200 Gb/s HDR
for A100, as in NVIDIA's DGX designs).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One GPU kind as the cost model sees it."""

    name: str
    device_pattern: str  # its entry in DATASHEET_BF16_FLOPS: which measured devices are this kind
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s per direction, between GPUs of one node
    network_bandwidth: float  # bytes/s per direction, this GPU's share of the node's inter-node links
    gpus_per_node: int = 8

    @property
    def peak_bf16_flops(self) -> float:
        """Dense tensor-core bf16 FLOP/s (no sparsity): the datasheet table's entry for this kind."""
        return dict(DATASHEET_BF16_FLOPS)[self.device_pattern]


GPUS = {
    "h100": GPU("H100 SXM", "H100", 80 * GIB, 3.35e12, 450e9, 400e9 / 8),
    "h200": GPU("H200 SXM", "H200", 141 * GIB, 4.8e12, 450e9, 400e9 / 8),
    "a100": GPU("A100 SXM 80GB", "A100", 80 * GIB, 2.039e12, 300e9, 200e9 / 8),
}

# Dense bf16 peaks (FLOP/s) by a substring of the device's name, more specific names first (an 'H100 PCIe'
# is not an SXM 'H100'); unknown devices report no MFU.
DATASHEET_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("B200", 2250e12),
)


def device_pattern(device_name: str) -> str | None:
    """The DATASHEET_BF16_FLOPS entry the device called ``device_name`` (torch or NVML) matches, else None."""
    return next((pattern for pattern, _ in DATASHEET_BF16_FLOPS if pattern in device_name), None)


def datasheet_bf16_flops(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of the device called ``device_name``, else None."""
    return dict(DATASHEET_BF16_FLOPS).get(device_pattern(device_name))


def gpu(kind: str) -> GPU:
    if kind not in GPUS:
        raise ValueError(f"unknown gpu {kind!r}; choose one of {tuple(GPUS)}")
    return GPUS[kind]
