"""Training presets: the demo (the main job) and the model presets' real-run defaults."""

from __future__ import annotations

from ..config import PRESETS
from .config import TrainConfig


# The demo: a tiny InternVL3 (the "tiny" preset widened, 112-pixel tiles of 16 tokens) on the generated
# shapes and clips (4 frames each) mixed 1:3 with the embedded corpus, sized to run in about five minutes on
# 2 CPU cores (single-threaded). What it learns, the learning rates and data layouts that did worse, and
# why shape and motion stay near chance: bench/results/README.md, "Demo training run".
DEMO = {
    "model": {
        "preset": "tiny",
        "vision": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "image_size": 112},
        "text": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384},
    },
    "output_dir": "runs/demo",
    "max_steps": 1100,
    "cpu_threads": 1,
    "optim": {"lr": 5e-4, "warmup_steps": 30, "betas": (0.9, 0.95)},
    "data": {"system_message": None, "max_packed_tokens": 2048, "max_tiles": 64, "max_buffers": 4, "max_num": 2, "video_frames": 4},
    "logging": {"log_every": 10, "log": ("tensorboard",)},
    "checkpoint": {"save_every": 200, "keep_last": 2},
}
# Applied over DEMO (section by section: an "optim" here changes only the fields it names).
DEMO_MODES = {
    "pretrain": {},
    "sft": {"output_dir": "runs/demo-sft", "max_steps": 300, "data": {"language_weight": 0.0}},
    "mpo": {"output_dir": "runs/demo-mpo", "max_steps": 60, "optim": {"lr": 2e-4, "warmup_steps": 5}, "checkpoint": {"save_every": 30}},
}
# The tiny model preset's real-run defaults over TrainConfig's.
TINY = {
    "optim": {"lr": 1e-3, "warmup_steps": 10},
    "data": {"system_message": None, "max_packed_tokens": 2048, "max_tiles": 32, "max_num": 6},
}
TRAIN_PRESETS = ("demo",) + PRESETS


def preset_config(name: str, mode: str = "pretrain") -> TrainConfig:
    """The TrainConfig of a preset: 'demo', or a model preset (real-run defaults: 448-pixel tiles, up to 12
    tiles an image, 8192-token packs)."""
    if name == "demo":
        return TrainConfig(mode=mode).updated(DEMO).updated(DEMO_MODES[mode])
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {TRAIN_PRESETS}")
    config = TrainConfig(mode=mode).updated({"model": {"preset": name}, "output_dir": f"runs/{name}"})
    if name == "tiny":
        config = config.updated(TINY)
    if mode == "mpo":
        # MPO refines a trained model: a lower learning rate (a quarter of the default one).
        config = config.updated({"output_dir": f"runs/{name}-mpo", "optim": {"lr": 2e-4 if name == "tiny" else config.optim.lr / 4}})
    return config
