"""Nothing lost: a background checkpoint is published (renamed into place) as soon as every rank has
written it, a run killed between two saves (SIGKILL, an exception) resumes from the last finished one, a
SIGTERM checkpoints the step being taken and stops, a new run removes the unpublished folders a crash left,
and a run that did all its work exits 0 (its process group torn down, not left to the interpreter)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from model.train.checkpointing import CheckpointWriter, list_checkpoints, remove_staging
from model.train.demo_data import generate
from model.train.metrics import read_metrics
from test_trainer import SMALL, SMALL_DATA, run, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_data")
    generate(str(folder), seed=0, config=SMALL_DATA)
    return folder


def test_a_finished_background_save_is_published_at_the_next_step_end_and_stale_staging_is_removed(tmp_path, monkeypatch):
    """publish_finished: nothing while the writer writes, the folder in place at the first call after it
    finished (no later save needed); remove_staging (a new run's, before its first step) removes the staging
    folders a crash left."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    release, real_save = threading.Event(), torch.save

    def slow_save(*args, **kwargs):
        release.wait(timeout=60)
        real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    writer = CheckpointWriter(str(tmp_path), sharded=False, keep_last=2, asynchronous=True)
    final = writer.save(3, {"step": 3}, model, optimizer)
    assert writer.publish_finished() is None and not os.path.exists(final)
    release.set()
    for _ in range(600):
        if writer.publish_finished() is not None:
            break
        time.sleep(0.05)
    assert [path for _, path in list_checkpoints(str(tmp_path))] == [final]
    assert writer.publish_finished() is None  # nothing in flight

    writer.close()
    os.makedirs(os.path.join(tmp_path, "checkpoints", "step_00000006.tmp", "model"))  # a crash mid-save
    assert remove_staging(str(tmp_path)) == [os.path.join(tmp_path, "checkpoints", "step_00000006.tmp")]
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["step_00000003"]


def test_an_exception_between_two_saves_keeps_the_finished_one(data_dir, tmp_path, monkeypatch):
    """One process: a step that raises after a background save leaves that save published, and the run
    resumes from it to the uninterrupted run's losses."""
    from model.train.trainer import Trainer

    settings = {"max_steps": 8, "checkpoint": {"save_every": 3}}
    full = run(small_config(data_dir, tmp_path / "full", **settings))
    real_step = Trainer.train_step

    def failing_step(self):
        if self.scheduler.last_epoch == 4:  # during step 5
            raise RuntimeError("node lost")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="node lost"):
        run(small_config(data_dir, tmp_path / "crashed", **settings))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert [step for step, _ in list_checkpoints(str(tmp_path / "crashed"))] == [3]
    resumed = run(small_config(data_dir, tmp_path / "crashed", **settings), resume="auto")
    assert resumed.losses == full.losses[3:]


def _launch(data_dir, tmp_path, output, ranks: int, *arguments) -> subprocess.Popen:
    """python -m model.train (ranks 1) or torchrun over ``ranks`` gloo ranks, on the small settings, started
    in the background with every step logged."""
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({**SMALL, "data": {**SMALL["data"], "path": str(data_dir / "meta.json")}}))
    launcher = [sys.executable, "-m", "model.train"]
    if ranks > 1:
        plan = tmp_path / "plan.yaml"
        plan.write_text("{}\n")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                    "-m", "model.train", "--plan", str(plan)]
    command = [*launcher, "--preset", "tiny", "--config", str(config_file), "--output-dir", str(output), "--log-every", "1",
               "--no-progress", *arguments]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _steps(output) -> list[dict]:
    path = output / "metrics.jsonl"
    return [entry for entry in read_metrics(str(path)) if "event" not in entry] if path.exists() else []


def _wait_for(condition, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) first:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def _workers(process: subprocess.Popen) -> list[int]:
    """The process ids of torchrun's worker processes (its children)."""
    with open(f"/proc/{process.pid}/task/{process.pid}/children", encoding="utf-8") as handle:
        return [int(pid) for pid in handle.read().split()]


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "torchrun-2"])
def test_a_run_killed_between_two_saves_resumes_from_the_last_finished_one(data_dir, tmp_path, ranks):
    """SIGKILL (one process, or one of torchrun's workers) after the save of step 4 and before that of step
    8: the background save of step 4 was published within a step or two of finishing, so --resume auto
    continues from it, to the same losses and gradient norms as the killed run logged for those steps."""
    output = tmp_path / "run"
    process = _launch(data_dir, tmp_path, output, ranks, "--max-steps", "10", "--save-every", "4")
    try:
        _wait_for(lambda: list_checkpoints(str(output)), process)
        assert max(entry["step"] for entry in _steps(output)) < 8  # published before the next save began
        victim = process.pid if ranks == 1 else _workers(process)[0]
        os.kill(victim, signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    killed = {entry["step"]: entry for entry in _steps(output)}
    assert [step for step, _ in list_checkpoints(str(output))] == [4]
    resumed = _launch(data_dir, tmp_path, output, ranks, "--max-steps", "10", "--save-every", "4", "--resume", "auto")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    assert "step_00000004 at step 4" in log
    entries = _steps(output)  # the log was cut back to step 4 on resuming
    assert [entry["step"] for entry in entries] == list(range(1, 11))
    after = entries[4:]
    again = [entry for entry in after if entry["step"] in killed]
    assert again and all(entry["loss"] == killed[entry["step"]]["loss"] and entry["grad_norm"] == killed[entry["step"]]["grad_norm"]
                         for entry in again)


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "torchrun-2"])
def test_sigterm_checkpoints_the_step_and_stops_cleanly(data_dir, tmp_path, ranks):
    """SIGTERM (to the process, or to torchrun, which passes it to its workers) mid-run: the step being taken
    is finished and checkpointed, the run says so and exits with status 143 (one process); --resume auto
    continues from that step to the end."""
    output = tmp_path / "run"
    process = _launch(data_dir, tmp_path, output, ranks, "--max-steps", "40", "--save-every", "100")
    try:
        _wait_for(lambda: len(_steps(output)) >= 2, process)
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    if ranks == 1:
        assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    stopped = [entry for entry in read_metrics(str(output / "metrics.jsonl")) if entry.get("event") == "stopped"]
    assert len(stopped) == 1 and "stopped by" in log, log[-3000:]
    last = stopped[0]["step"]
    assert last < 40 and [step for step, _ in list_checkpoints(str(output))] == [last]
    assert max(entry["step"] for entry in _steps(output)) == last
    resumed = _launch(data_dir, tmp_path, output, ranks, "--max-steps", str(last + 2), "--resume", "auto")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    assert [entry["step"] for entry in _steps(output)][-2:] == [last + 1, last + 2]
