"""The training run's settings: TrainConfig and the YAML/JSON config file that overrides them."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from ..config import InternVL3Config
from ..data import INTERNVL3_SYSTEM_MESSAGE
from .metrics import log_backends
from .mpo import MPO_BETA, MPO_WEIGHTS


MODES = ("pretrain", "sft", "mpo")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class TrainConfig:
    """Everything a run needs; presets below, overridden by a --config file and the command line.

    ``model``: {"preset": name, "vision": {...}, "projector": {...}, "text": {...}} (fields override the
    preset's). ``init``: a save_pretrained folder to start from instead (its config wins). ``data``: a meta
    JSON; None generates the demo data into ``<output_dir>/data``. ``tokenizer``: a Hugging Face tokenizer
    folder; None is the embedded byte tokenizer. ``system_message``: "internvl3" (InternVL3's), None
    (no system turn) or the text itself. ``log``: metric backends beside metrics.jsonl, "tensorboard"
    and/or "wandb" (a list or a comma-separated string; model/metrics.py). The learning-rate schedule
    (warmup_steps, max_steps, min_lr_ratio) is this config's also when resuming: a checkpoint's run with
    another max_steps continues on the cosine of this one.
    """

    mode: str = "pretrain"
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    init: Optional[str] = None
    data: Optional[str] = None
    tokenizer: Optional[str] = None
    system_message: Optional[str] = "internvl3"
    output_dir: str = "runs/tiny"
    seed: int = 0
    # optimisation
    max_steps: int = 1000
    grad_accum: int = 1
    lr: float = 2e-5
    lr_vision: Optional[float] = None
    lr_projector: Optional[float] = None
    lr_language: Optional[float] = None
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    device: str = "auto"  # "cuda" (one GPU per local rank), "cpu" (gloo), or "auto": cuda when available
    autocast_dtype: str = "bfloat16"  # on CUDA; CPU runs in float32
    cpu_threads: Optional[int] = None
    # data
    max_packed_tokens: int = 8192
    max_tiles: int = 40
    max_buffers: int = 20
    max_num: int = 12  # tiles per image (dynamic tiling), a thumbnail added when more than one
    min_num: int = 1
    use_thumbnail: bool = True
    loss_mode: str = "square"
    overlong: str = "truncate"
    language_weight: float = 1.0
    multimodal_weight: float = 3.0
    augment: bool = True
    # MPO
    mpo_beta: float = MPO_BETA
    mpo_weights: tuple = MPO_WEIGHTS
    # reporting
    log_every: int = 10
    log: tuple = ()  # metric backends beside metrics.jsonl: "tensorboard", "wandb"
    save_every: int = 500
    keep_last: int = 2
    eval_file: Optional[str] = None  # multiple-choice questions (the demo's eval.jsonl format)
    eval_examples: Optional[int] = None
    eval_delta: float = 0.25  # V2PE delta at evaluation

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        self.betas = tuple(self.betas)
        self.mpo_weights = tuple(self.mpo_weights)
        self.log = log_backends(self.log)
        for name in ("max_steps", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def updated(self, overrides: dict) -> "TrainConfig":
        """A copy with ``overrides`` applied; ``model`` merges key by key (and one level deeper)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        values = dataclasses.asdict(self)
        for key, value in overrides.items():
            if key == "model" and isinstance(value, dict):
                merged = copy.deepcopy(values["model"])
                for part, setting in value.items():
                    if isinstance(setting, dict) and isinstance(merged.get(part), dict):
                        merged[part] = {**merged[part], **setting}
                    else:
                        merged[part] = setting
                values["model"] = merged
            else:
                values[key] = value
        return TrainConfig(**values)

    def model_config(self) -> InternVL3Config:
        settings = dict(self.model)
        config = InternVL3Config.preset(settings.pop("preset", "tiny"))
        for part in ("vision", "projector", "text"):
            if part in settings:
                setattr(config, part, dataclasses.replace(getattr(config, part), **settings.pop(part)))
        for key, value in settings.items():
            if not hasattr(config, key):
                raise ValueError(f"unknown model setting {key!r}")
            setattr(config, key, value)
        return config

    def system_text(self) -> Optional[str]:
        return INTERNVL3_SYSTEM_MESSAGE if self.system_message == "internvl3" else self.system_message


def load_config_file(path: str) -> dict:
    """A YAML or JSON mapping of TrainConfig fields (JSON is YAML, but a .json file gets JSON's errors)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of settings, got {type(data).__name__}")
    return data
