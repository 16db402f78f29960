"""A run's process set-up: its device, the process group, the seeds; a pack sent between peers."""

from __future__ import annotations

import os
import random
from dataclasses import fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data import PackedBatch


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


def broadcast_batch(batch: Optional[PackedBatch], group, group_src: int, device: torch.device) -> PackedBatch:
    """The pack ``batch`` of the group rank ``group_src`` on every rank of ``group`` (the others pass None),
    its tensors on ``device``: the host fields go pickled in one small object, each tensor by a tensor
    broadcast (pickling the pixels too costs several times more)."""
    sending = dist.get_rank(group) == group_src
    layout = None
    if sending:
        batch = batch.to(device)
        layout = {entry.name: (("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else ("value", value))
                  for entry in fields(batch) for value in [getattr(batch, entry.name)]}
    holder = [layout]
    dist.broadcast_object_list(holder, group=group, group_src=group_src, device=device if device.type == "cuda" else None)
    values = {}
    for name, entry in holder[0].items():
        if entry[0] == "value":
            values[name] = entry[1]
            continue
        tensor = getattr(batch, name) if sending else torch.empty(entry[1], dtype=entry[2], device=device)
        # bool goes as its bytes (not every backend reduces or sends bool)
        dist.broadcast(tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor, group=group, group_src=group_src)
        values[name] = tensor
    return PackedBatch(**values)
