"""Training checkpoints: written atomically, the last K kept, resumable bit for bit.

A checkpoint is a folder ``<output>/checkpoints/step_<N>``:
- single process: ``trainer.pt`` with the model, optimizer and scheduler states, the step, the RNG states
  (python, numpy, torch, CUDA), the data loader's position and the MPO reward shift;
- under a parallel plan: ``model/`` (model and optimizer through internvl3_engine.parallel.save_sharded,
  loadable at another world size) and ``trainer.pt`` without them.
Everything is written into ``step_<N>.tmp`` and renamed to ``step_<N>`` (os.replace) once complete, so a
crash never leaves a folder that looks like a checkpoint; ``latest`` only considers renamed folders.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
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


def save_checkpoint(output_dir: str, step: int, trainer_state: dict, model, optimizer, sharded: bool, keep_last: int) -> str:
    """Write the checkpoint of ``step`` atomically and delete all but the last ``keep_last``. Every rank
    calls it (a sharded save is collective); rank 0 writes trainer_state (which, unsharded, also holds
    model and optimizer)."""
    folder = checkpoint_dir(output_dir)
    final = os.path.join(folder, f"step_{step:08d}")
    staging = final + ".tmp"
    if _rank() == 0:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)
    _barrier()
    state = dict(trainer_state)
    if sharded:
        from internvl3_engine.parallel import save_sharded

        save_sharded(os.path.join(staging, SHARDED_FOLDER), model, optimizer)
    else:
        state["model"] = model.state_dict()
        state["optimizer"] = optimizer.state_dict()
    if _rank() == 0:
        torch.save(state, os.path.join(staging, TRAINER_FILE))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


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
