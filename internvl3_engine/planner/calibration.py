"""The compute efficiency (achieved / peak FLOP/s) the cost model assumes: DEFAULT_EFFICIENCY, or the MFU
measured by the benchmark's train suite (``python -m bench --suite train``) on the same kind of GPU.

The measured figure is a single-GPU training step of the reference model (bf16, no activation
checkpointing): model FLOPs per second over the datasheet peak (``mfu_vs_datasheet`` of each row), which is
exactly the efficiency the cost model applies to the model's FLOPs. The largest preset measured is used
(its matmuls are the closest to the sizes planned for); among records, the newest file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .hardware import GPU, device_pattern
from ..architectures import PRESETS

DEFAULT_EFFICIENCY = 0.40  # between torchtitan's measured 30-39% (Llama 3.1 8B, FSDP2) and 2024 MLLM systems' 41-55%


@dataclass(frozen=True)
class Calibration:
    efficiency: float
    source: str


def default_results_dir() -> Path | None:
    """bench/results of the source checkout this package sits in, if there is one."""
    folder = Path(__file__).resolve().parents[2] / "bench" / "results"
    return folder if folder.is_dir() else None


def _size_rank(preset: str) -> int:
    return PRESETS.index(preset) if preset in PRESETS else -1


def calibrate(gpu: GPU, results_dir: Path | str | None) -> Calibration:
    """The measured efficiency on ``gpu``'s kind from the train-suite records (*.json) in ``results_dir``,
    else DEFAULT_EFFICIENCY."""
    best = None
    for path in sorted(Path(results_dir).glob("*.json")) if results_dir is not None else ():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a benchmark record
        if not isinstance(record, dict) or not isinstance(record.get("device"), dict):
            continue
        device = record["device"]
        if device_pattern(device.get("nvml_name") or device.get("name") or "") != gpu.device_pattern:
            continue
        for row in record.get("train") or ():
            if row.get("status") != "ok" or not row.get("mfu_vs_datasheet"):
                continue
            key = (_size_rank(row.get("preset", "")), path.name)
            if best is None or key >= best[0]:
                best = (key, row, path)
    if best is None:
        where = f"no {gpu.device_pattern} train-suite record in {results_dir}" if results_dir else "no results folder"
        return Calibration(DEFAULT_EFFICIENCY, f"default ({where})")
    _, row, path = best
    return Calibration(
        float(row["mfu_vs_datasheet"]),
        f"measured: MFU of {row['preset']} ({row.get('median_step_ms', 0):.0f} ms a step) in {path}",
    )
