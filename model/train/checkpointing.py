"""Training checkpoints: written atomically, the last K kept, resumable bit for bit.

A checkpoint is a folder ``<output>/checkpoints/step_<N>``:
- single process: ``trainer.pt`` with the model, optimizer and scheduler states, the step, the RNG states
  (python, numpy, torch, CUDA), the data loader's position and the MPO reward shift;
- under a parallel plan: ``model/`` (model and optimizer through internvl3_engine.parallel.save_sharded,
  loadable at another world size) and ``trainer.pt`` without them.
Everything is written into ``step_<N>.tmp`` and renamed to ``step_<N>`` (os.replace) once complete on
every rank, so a crash never leaves a folder that looks like a checkpoint; ``latest`` only considers
renamed folders, and a new run removes the ``.tmp`` folders a crash left. CheckpointWriter can write in the
background: the state is copied to CPU memory at the save, a thread writes it while training goes on, and
the loop publishes it (the rename) at the first step end where every rank's writer has finished
(``publish_finished``), so a crash loses at most the steps since the last finished save.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STAGING_PATTERN = re.compile(r"^step_(\d+)\.tmp$")
TRAINER_FILE = "trainer.pt"
SHARDED_FOLDER = "model"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints, oldest first."""
    folder = checkpoint_dir(output_dir)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(folder, name, TRAINER_FILE)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint folder ``--resume`` names: a path, or 'auto' for the latest in output_dir (None when
    there is none yet: a fresh start)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume, TRAINER_FILE)):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {TRAINER_FILE})")
    return resume


class CheckpointWriter:
    """Writes the run's checkpoints into ``<output_dir>/checkpoints`` and keeps the last ``keep_last``.
    Every rank calls ``save``, ``publish_finished`` and ``wait`` at the same steps (a sharded save is
    collective); rank 0 writes trainer_state (which, unsharded, also holds model and optimizer).
    ``asynchronous``: ``save`` returns once the state is copied to CPU memory and a thread writes it; the
    folder is renamed into place by the first ``publish_finished`` that finds every rank's writer done, or
    by the next ``save`` or ``wait`` (call ``wait`` or ``close`` before the run ends); else ``save`` returns
    once it is in place. ``device``: where the ranks' done flags are reduced (the training backend's device)."""

    def __init__(self, output_dir: str, sharded: bool, keep_last: int, asynchronous: bool, device: Optional[torch.device] = None):
        self.output_dir, self.sharded, self.keep_last, self.asynchronous = output_dir, sharded, keep_last, asynchronous
        self.device = device or torch.device("cpu")
        self._pending = None  # (what to wait for, staging folder, final folder)
        self._thread = ThreadPoolExecutor(max_workers=1) if asynchronous and not sharded else None
        # The DCP writer thread's collectives go over a group of their own, apart from training's.
        self._group = dist.new_group(backend="gloo") if asynchronous and sharded else None

    def save(self, step: int, trainer_state: dict, model, optimizer) -> str:
        """Write (or start writing) the checkpoint of ``step``; returns its folder's final path."""
        self.wait()
        final = os.path.join(checkpoint_dir(self.output_dir), f"step_{step:08d}")
        staging = final + ".tmp"
        if _rank() == 0:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.exists(staging):
                shutil.rmtree(staging)
            os.makedirs(staging)
        _barrier()
        state, waiting = dict(trainer_state), None
        if self.sharded:
            from internvl3_engine.parallel import async_save_sharded, save_sharded

            folder = os.path.join(staging, SHARDED_FOLDER)
            if self.asynchronous:
                waiting = async_save_sharded(folder, model, optimizer, process_group=self._group)
            else:
                save_sharded(folder, model, optimizer)
        else:
            state["model"] = model.state_dict()
            state["optimizer"] = optimizer.state_dict()
        trainer_file = os.path.join(staging, TRAINER_FILE)
        if self._thread is not None:
            waiting = self._thread.submit(torch.save, _cpu_copy(state), trainer_file)
        elif _rank() == 0:
            torch.save(state, trainer_file)
        self._pending = (waiting, staging, final)
        if not self.asynchronous:
            self.wait()
        return final

    def publish_finished(self) -> Optional[str]:
        """Publish the save in flight if its writer has finished on every rank (one all-reduce of a done flag
        while a save is in flight; nothing otherwise): returns its folder, else None. Call it on every rank
        at the same steps (the loop: after each step)."""
        if self._pending is None:
            return None
        done = torch.tensor(float(_finished(self._pending[0])), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() < 1:
            return None
        final = self._pending[2]
        self.wait()
        return final

    def wait(self) -> None:
        """Finish the save in flight, if any: wait for its writer, then rename it into place and drop the
        checkpoints beyond keep_last. Raises what the writer raised (the checkpoint then stays absent)."""
        if self._pending is None:
            return
        waiting, staging, final = self._pending
        self._pending = None
        if isinstance(waiting, Future):
            waiting.result()
        elif waiting is not None:
            waiting.wait()  # a PendingSave: its shards in place
        if _rank() == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
            for _, old in list_checkpoints(self.output_dir)[:-self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def close(self, publish: bool = True) -> None:
        """End the writer: with ``publish``, finish and publish the save in flight (``wait``: collective);
        without (a failed run, whose ranks may not reach a collective), only let this rank's writer finish,
        leaving its staging folder unpublished. Then stop the writer thread and free the writer's group."""
        if publish:
            self.wait()
        elif self._pending is not None:
            with contextlib.suppress(Exception):  # the failure that ends the run is the one to report
                _result(self._pending[0])
            self._pending = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


def _finished(waiting) -> bool:
    """Whether this rank's writer of a save is done (a Future, a PendingSave or None: written already)."""
    return waiting is None or waiting.done()


def _result(waiting) -> None:
    """Wait for this rank's writer of a save, without publishing it."""
    if isinstance(waiting, Future):
        waiting.result()
    elif waiting is not None:
        waiting.join()


def remove_staging(output_dir: str) -> list[str]:
    """Remove the staging folders (``step_<N>.tmp``) in output_dir's checkpoints: saves a crashed run never
    published (unfinished on some rank, or finished after the last step end that could publish them). For a
    run about to write checkpoints there (a dry run leaves them: another run may be writing one). Returns the
    folders removed."""
    folder = checkpoint_dir(output_dir)
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if STAGING_PATTERN.match(name):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                removed.append(os.path.join(folder, name))
    return removed


def _cpu_copy(value):
    """A copy of a state (nested dicts, lists, tuples) whose tensors are CPU copies: what training changes in
    place after the save cannot reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return copy.deepcopy(value)


def load_checkpoint(path: str, model, optimizer, sharded: bool) -> dict:
    """Restore model and optimizer from the checkpoint folder ``path``; returns the trainer state (step,
    scheduler, RNG, data position, ...) for the caller to apply."""
    state = torch.load(os.path.join(path, TRAINER_FILE), map_location="cpu", weights_only=False)
    if sharded:
        from internvl3_engine.parallel import load_sharded

        load_sharded(os.path.join(path, SHARDED_FOLDER), model, optimizer)
    else:
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
    return state
