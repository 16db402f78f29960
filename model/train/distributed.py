"""A run's process set-up: its device, the process group, the seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(setting: str) -> torch.device:
    """The device of this process for the config's ``device`` setting: on CUDA, the GPU of its local rank."""
    use_cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA device (use device: cpu)")
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {count}; start at most {count} processes "
                         "per node, or train on the CPU with device: cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world): from torchrun's environment, or a one-process group so a plan also runs alone (an
    in-memory store: no port, so runs side by side never collide); NCCL on CUDA, gloo on the CPU."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
