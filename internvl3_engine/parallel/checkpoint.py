"""Sharded checkpoints with torch.distributed.checkpoint: saved at one world size, loadable at another.

Written atomically: every rank writes into ``<path>.tmp``, and rank 0 renames it to ``path`` after all
ranks finished, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def _state(model: nn.Module, optimizer) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Save model (and optimizer) state to the folder ``path``, every rank its own shards."""
    path = os.fspath(path)
    staging = path + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and os.path.exists(staging):
        shutil.rmtree(staging)
    _barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=staging)
    _barrier()
    if rank == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    _barrier()


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Load a checkpoint written by save_sharded into ``model`` (and ``optimizer``), resharding as needed."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
