"""Launch configuration of the Triton attention kernels: block sizes, warps and pipeline stages per kernel
and head dim, and their override by the environment variable INTERNVL3_ENGINE_ATTENTION_BLOCKS.

The override lets a user tune the kernels on their GPU without editing the package (and
``python -m bench.attention_blocks`` sweeps candidates on a GPU through it). Its value is a ``;``-separated list
of ``KERNEL[@HEAD_DIM]=BLOCK_M,BLOCK_N,WARPS,STAGES``: KERNEL is forward, dkdv or dq; HEAD_DIM (the head dim
padded to a power of two) limits the entry to one head dim, else it applies to all. For example
``forward@128=128,64,8,3;dkdv@128=64,64,8,2``. Entries are checked when read (ValueError naming the
variable), and apply under the Triton interpreter too.
"""

from __future__ import annotations

import functools
import os

import torch

from ...dispatch import triton_interpret

BLOCKS_ENV_VAR = "INTERNVL3_ENGINE_ATTENTION_BLOCKS"
KERNELS = ("forward", "dkdv", "dq")
_MAX_BLOCK = 256
_MAX_WARPS = 16

# Per kernel: (largest padded head dim, (BLOCK_M, BLOCK_N, num_warps, num_stages, num_stages on sm_90+)),
# by increasing head dim; the last row also serves anything larger.
_GPU_BLOCKS = {
    "forward": ((64, (128, 64, 4, 3, 3)), (128, (128, 64, 8, 2, 3)), (256, (64, 32, 4, 2, 2))),
    "dkdv": ((64, (32, 128, 4, 2, 2)), (128, (32, 64, 4, 2, 2)), (256, (16, 32, 4, 1, 1))),
    "dq": ((64, (128, 32, 4, 2, 2)), (128, (64, 32, 4, 2, 2)), (256, (32, 16, 4, 1, 1))),
}


def padded_head_dim(head_dim: int) -> int:
    """The head dim as the kernels pad it (the next power of two): the HEAD_DIM of an override entry."""
    return 1 << max(head_dim - 1, 0).bit_length()


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_blocks(kernel: str, block_m: int, block_n: int, warps: int, stages: int) -> None:
    """ValueError unless (BLOCK_M, BLOCK_N, warps, stages) can launch ``kernel``: blocks powers of two from 16
    to 256 (tl.arange and tl.dot), warps a power of two up to 16, stages >= 1, and the diagonal split's
    divisibility: BLOCK_M a multiple of BLOCK_N in 'forward' and 'dq', BLOCK_N of BLOCK_M in 'dkdv'."""
    if kernel not in KERNELS:
        raise ValueError(f"{BLOCKS_ENV_VAR}: kernel must be one of {KERNELS}, got {kernel!r}")
    for name, block in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if not (_is_power_of_2(block) and 16 <= block <= _MAX_BLOCK):
            raise ValueError(f"{BLOCKS_ENV_VAR}: {kernel} {name} must be a power of two from 16 to {_MAX_BLOCK}, got {block}")
    if not (_is_power_of_2(warps) and warps <= _MAX_WARPS):
        raise ValueError(f"{BLOCKS_ENV_VAR}: {kernel} warps must be a power of two up to {_MAX_WARPS}, got {warps}")
    if stages < 1:
        raise ValueError(f"{BLOCKS_ENV_VAR}: {kernel} stages must be at least 1, got {stages}")
    larger, smaller = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
    if larger % smaller:
        which = "BLOCK_N a multiple of BLOCK_M" if kernel == "dkdv" else "BLOCK_M a multiple of BLOCK_N"
        raise ValueError(f"{BLOCKS_ENV_VAR}: {kernel} needs {which}, got BLOCK_M={block_m}, BLOCK_N={block_n}")


@functools.lru_cache(maxsize=16)
def parse_overrides(value: str) -> dict[tuple[str, int | None], tuple[int, int, int, int]]:
    """{(kernel, padded head dim or None for every head dim): (BLOCK_M, BLOCK_N, warps, stages)} of an
    INTERNVL3_ENGINE_ATTENTION_BLOCKS value (see the module docstring)."""
    overrides = {}
    for entry in filter(None, (part.strip() for part in value.split(";"))):
        target, equals, numbers = entry.partition("=")
        kernel, _, head_dim = target.strip().partition("@")
        try:
            config = tuple(int(number) for number in numbers.split(","))
            padded = int(head_dim) if head_dim else None
        except ValueError:
            config, padded = (), None
        if not equals or len(config) != 4 or (padded is not None and not _is_power_of_2(padded)):
            raise ValueError(
                f"{BLOCKS_ENV_VAR} entries must read KERNEL[@HEAD_DIM]=BLOCK_M,BLOCK_N,WARPS,STAGES with HEAD_DIM a "
                f"power of two, got {entry!r}"
            )
        check_blocks(kernel.strip(), *config)
        overrides[(kernel.strip(), padded)] = config
    return overrides


def attention_blocks(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ('forward', 'dkdv' or 'dq').

    BLOCK_M tiles queries and BLOCK_N keys. An INTERNVL3_ENGINE_ATTENTION_BLOCKS entry for the kernel (for
    its head dim first, else for every head dim) wins. Otherwise: under the interpreter, small blocks keep
    the CPU tests fast; on the GPU, sizes that fit sm_80's shared memory and registers, with deeper
    pipelines on sm_90+; float32 tiles take twice the memory, so their blocks are halved."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    padded = padded_head_dim(head_dim)
    overrides = parse_overrides(os.environ.get(BLOCKS_ENV_VAR, ""))
    override = overrides.get((kernel, padded)) or overrides.get((kernel, None))
    if override is not None:
        return override
    if triton_interpret():
        return 16, 16, 1, 1
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    for largest_head_dim, (block_m, block_n, warps, stages, hopper_stages) in _GPU_BLOCKS[kernel]:
        if padded <= largest_head_dim:
            break
    if hopper:
        stages = hopper_stages
    if dtype == torch.float32:
        block_m, block_n = max(block_m // 2, 16), max(block_n // 2, 16)
    return block_m, block_n, warps, stages
