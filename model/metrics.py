"""What a run reports: metrics as JSON lines, the loss curve as a PNG, a progress bar, model FLOPs utilisation.

metrics.jsonl holds one object a line: training steps ({"step", "loss", "lr", "grad_norm", "tokens_per_s",
...; "mfu" on CUDA}) and events ({"event": "skipped_step" | "data_errors" | "eval" | "summary", ...}).
A resumed run first drops the lines of steps after its checkpoint (a crashed run may have logged them),
so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from internvl3_engine.plan import datasheet_bf16_flops


def peak_flops(device: torch.device) -> Optional[float]:
    """The datasheet's dense bf16 FLOP/s of a CUDA device (internvl3_engine.plan's table), for MFU; None
    on CPUs and unknown devices."""
    if device.type != "cuda":
        return None
    return datasheet_bf16_flops(torch.cuda.get_device_name(device))


class MetricsLog:
    """Appends JSON lines to ``path`` (only where ``enabled``: rank 0)."""

    def __init__(self, path: str, enabled: bool = True, resume_step: Optional[int] = None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            self._truncate_after(resume_step)

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


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5)
