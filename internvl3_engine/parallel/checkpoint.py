"""Sharded checkpoints with torch.distributed.checkpoint: saved at one world size, loadable at another.

Written atomically: every rank writes into ``<path>.tmp``, and rank 0 renames it to ``path`` after all
ranks finished, so a crash mid-save never leaves a checkpoint that looks complete. ``async_save_sharded``
does the same in the background (torch.distributed.checkpoint.async_save): the state is copied to CPU
memory before it returns, a thread writes it while training goes on, and ``PendingSave.wait`` renames it.
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _staging(path: str) -> str:
    """The folder a save of ``path`` writes into (emptied first): ``<path>.tmp``."""
    staging = path + ".tmp"
    if _rank() == 0 and os.path.exists(staging):
        shutil.rmtree(staging)
    _barrier()
    return staging


def _publish(staging: str, path: str) -> None:
    """Rename a complete save into place, once every rank's shards are written."""
    _barrier()
    if _rank() == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    _barrier()


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Save model (and optimizer) state to the folder ``path``, every rank its own shards."""
    path = os.fspath(path)
    staging = _staging(path)
    dcp.save(_state(model, optimizer), checkpoint_id=staging)
    _publish(staging, path)


class PendingSave:
    """A save that async_save_sharded started. ``wait`` (collective: every rank calls it, at the same point of
    its program) returns once every rank's shards are written and the folder renamed into place; it raises
    what the writer raised (the folder then stays absent). ``done`` and ``join`` look at this rank's writer
    alone."""

    def __init__(self, future, staging: str, path: str):
        self._future, self._staging, self.path = future, staging, path

    def done(self) -> bool:
        """Whether this rank's writer has finished (no collective: the ranks finish at different times)."""
        return self._future.done()

    def join(self) -> None:
        """Wait for this rank's writer only, renaming nothing (no collective): for a run ending on an error,
        whose ranks may never reach ``wait``. Raises what the writer raised."""
        self._future.result()

    def wait(self) -> None:
        self._future.result()
        _publish(self._staging, self.path)


def async_save_sharded(path: str | os.PathLike, model: nn.Module, optimizer=None, process_group=None) -> PendingSave:
    """save_sharded in the background: the state is staged to CPU memory before this returns (the parameters
    may change right after), then a thread writes it. ``process_group``: the group of the writer thread's
    collectives; give one apart from training's (a gloo group: ``dist.new_group(backend="gloo")``), which
    the thread may use while training runs its own. Finish with ``PendingSave.wait()``."""
    path = os.fspath(path)
    staging = _staging(path)
    future = dcp.async_save(_state(model, optimizer), checkpoint_id=staging, process_group=process_group,
                            no_dist=not dist.is_initialized())
    return PendingSave(future, staging, path)


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
