"""What a run reports: metrics as JSON lines (and TensorBoard / Weights & Biases when asked for), the loss
curve as a PNG, a progress bar, model FLOPs utilisation.

metrics.jsonl holds one object a line: training steps ({"step", "loss", "lr", "grad_norm", "tokens_per_s",
"data_wait_s", ...; "mfu" on CUDA; "imbalance" under a plan}) and events ({"event": "skipped_step" |
"data_errors" | "eval" | "summary", ...}). A resumed run first drops the lines of steps after its
checkpoint (a crashed run may have logged them), so the file reads as one uninterrupted run.

Backends (``logging.log`` setting, ``--log``): "tensorboard" writes event files under ``<output_dir>/tensorboard``
(torch.utils.tensorboard; a run hides that folder's events from its first step on, so a resumed run shows
no step twice and a fresh run none of an earlier one's); "wandb" logs to a Weights & Biases run (project,
entity and mode from wandb's own settings, e.g. WANDB_PROJECT, WANDB_MODE=offline). Both get the numbers
of every step line as "train/<name>" and the evaluation's accuracy as "eval/accuracy" (per question kind
"eval/<kind>/accuracy"), at the line's step.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
from typing import Iterable, Optional, Sequence, Union

import torch
from internvl3_engine.planner import datasheet_bf16_flops


def peak_flops(device: torch.device) -> Optional[float]:
    """The datasheet's dense bf16 FLOP/s of a CUDA device (internvl3_engine.planner's table), for MFU; None
    on CPUs and unknown devices."""
    if device.type != "cuda":
        return None
    return datasheet_bf16_flops(torch.cuda.get_device_name(device))


LOG_BACKENDS = ("tensorboard", "wandb")


class MissingPackageError(ImportError):
    """A --log backend's package is not installed; the message names what to pip install."""


def log_backends(setting: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """The ``log`` setting as backend names: a comma-separated string or a list of names; None, "" or
    "none": none (metrics.jsonl only, which is always written)."""
    if setting is None:
        return ()
    names = setting.split(",") if isinstance(setting, str) else setting
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"log: a comma-separated string or a list of backend names, got {setting!r}")
    chosen = [name.strip() for name in names if name.strip() not in ("", "none")]
    unknown = sorted(set(chosen) - set(LOG_BACKENDS))
    if unknown:
        raise ValueError(f"log: unknown backends {unknown}; choose from {list(LOG_BACKENDS)} (metrics.jsonl is always written)")
    return tuple(dict.fromkeys(chosen))


def import_backend(package: str):
    """The module ``package``, or MissingPackageError (one line: what to pip install) when it is not installed."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as error:
        if error.name != package:
            raise  # the package is there but one of its own imports fails: that traceback says why
        raise MissingPackageError(f"--log {package} needs the {package} package: pip install {package}") from None


class TensorBoardSink:
    """Scalars as TensorBoard events in ``folder``. Built where the run is set up (a missing package fails
    then); ``open`` starts the writer."""

    def __init__(self, folder: str):
        import_backend("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._writer_class = SummaryWriter
        self.writer = None

    def open(self, first_step: int) -> None:
        # purge_step: readers drop this folder's earlier events at first_step and later (those a resumed
        # run logs again; all of an earlier run's when a fresh run starts at step 1).
        self.writer = self._writer_class(self.folder, purge_step=first_step)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars to a Weights & Biases run (files under ``folder``/wandb), with ``run_config`` as its config;
    a resumed training run starts a new one, which logs from the resumed step on."""

    def __init__(self, folder: str, run_config: dict):
        self.wandb = import_backend("wandb")
        self.folder = folder
        self.run_config = run_config
        self.run = None

    def open(self, first_step: int) -> None:
        self.run = self.wandb.init(dir=self.folder, config=self.run_config)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def build_sinks(backends: Iterable[str], output_dir: str, run_config: dict) -> list:
    """The sinks of ``backends`` (log_backends' names) for a run writing into ``output_dir``."""
    makers = {
        "tensorboard": lambda: TensorBoardSink(os.path.join(output_dir, "tensorboard")),
        "wandb": lambda: WandbSink(output_dir, run_config),
    }
    return [makers[name]() for name in backends]


def entry_scalars(entry: dict) -> dict[str, float]:
    """The numbers a backend gets from a metrics.jsonl entry: a step line's as "train/<name>", an eval
    event's accuracies; nothing from other events."""
    if "event" not in entry:
        return {f"train/{name}": float(value) for name, value in entry.items() if name != "step" and _is_number(value)}
    if entry["event"] != "eval":
        return {}
    scalars = {"eval/accuracy": float(entry["accuracy"])}
    for kind, values in entry.get("per_kind", {}).items():
        scalars[f"eval/{kind}/accuracy"] = float(values["accuracy"])
    return scalars


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class MetricsLog:
    """Appends JSON lines to ``path`` and passes each entry's scalars (entry_scalars) to ``sinks`` (only
    where ``enabled``: rank 0). ``close`` closes the sinks."""

    def __init__(self, path: str, enabled: bool = True, resume_step: Optional[int] = None, sinks: Sequence = ()):
        self.path = path
        self.enabled = enabled
        self.sinks = list(sinks) if enabled else []
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            self._truncate_after(resume_step)
        for sink in self.sinks:
            sink.open((resume_step or 0) + 1)

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if entry.get("step", 0) <= step and entry.get("event") != "summary":
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True, default=_plain) + "\n")
        scalars = entry_scalars(entry)
        if scalars:
            for sink in self.sinks:
                sink.write(entry["step"], scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_loss_curve(metrics_path: str, png_path: str, title: str = "training loss") -> Optional[str]:
    """The logged loss per step and its trailing mean (over a twentieth of the points) from metrics.jsonl,
    as a PNG. A trailing window, not an exponential average started at the first loss, which would lag far
    above a loss that falls fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for entry in read_metrics(metrics_path):
        if "event" not in entry and "loss" in entry and math.isfinite(entry["loss"]):
            steps.append(entry["step"])
            losses.append(entry["loss"])
    if not steps:
        return None
    window = max(1, len(losses) // 20)
    smoothed = [sum(losses[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    axes.plot(steps, smoothed, color="#c33", linewidth=1.6, label=f"mean of the last {window} points")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


def progress_bar(total: int, initial: int, enabled: bool, items=None, description: Optional[str] = None, unit: str = "step"):
    """A tqdm bar (over ``items`` when given)."""
    from tqdm import tqdm

    return tqdm(items, total=total, initial=initial, disable=not enabled, unit=unit, desc=description, dynamic_ncols=True, mininterval=0.5)
