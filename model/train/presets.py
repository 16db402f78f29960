"""Training presets: the demo (the main job) and the model presets' real-run defaults."""

from __future__ import annotations

from typing import Any

from ..config import PRESETS
from .config import TrainConfig


# The demo: a tiny InternVL3 (the "tiny" preset widened, 112-pixel tiles of 16 tokens) on the generated
# shapes data mixed 1:3 with the embedded corpus, sized to learn in about seven minutes on 2 CPU cores
# (single-threaded). What it learns and what did not help: bench/results/README.md, "Demo training run".
DEMO = {
    "model": {
        "preset": "tiny",
        "vision": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "image_size": 112},
        "text": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384},
    },
    "system_message": None,
    "output_dir": "runs/demo",
    "max_steps": 1100,
    "lr": 6e-3,
    "warmup_steps": 30,
    "betas": (0.9, 0.95),
    "max_packed_tokens": 2048,
    "max_tiles": 64,
    "max_buffers": 4,
    "max_num": 2,
    "log_every": 10,
    "save_every": 200,
    "keep_last": 2,
    "cpu_threads": 1,
    "log": ("tensorboard",),
}
DEMO_MODES = {
    "pretrain": {},
    "sft": {"output_dir": "runs/demo-sft", "language_weight": 0.0, "max_steps": 300},
    "mpo": {"output_dir": "runs/demo-mpo", "max_steps": 60, "lr": 2e-4, "warmup_steps": 5, "save_every": 30},
}
TRAIN_PRESETS = ("demo",) + PRESETS


def preset_config(name: str, mode: str = "pretrain") -> TrainConfig:
    """The TrainConfig of a preset: 'demo', or a model preset (real-run defaults: 448-pixel tiles, up to 12
    tiles an image, 8192-token packs)."""
    if name == "demo":
        return TrainConfig(mode=mode).updated({**DEMO, **DEMO_MODES[mode]})
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {TRAIN_PRESETS}")
    overrides: dict[str, Any] = {"model": {"preset": name}, "output_dir": f"runs/{name}"}
    if name == "tiny":
        overrides.update(system_message=None, max_packed_tokens=2048, max_tiles=32, max_num=6, lr=1e-3, warmup_steps=10)
    if mode == "mpo":
        overrides.update(lr=overrides.get("lr", 2e-5) / 4 if name != "tiny" else 2e-4, output_dir=f"runs/{name}-mpo")
    return TrainConfig(mode=mode).updated(overrides)
