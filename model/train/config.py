"""The training run's settings: TrainConfig (nested, one section per concern) and the YAML/JSON config file
that overrides them.

TrainConfig holds the run itself (mode, model, init, output_dir, seed, max_steps, grad_accum,
activation_checkpointing, device, autocast_dtype, cpu_threads) and a section per concern: ``optim``
(OptimConfig), ``data`` (DataConfig), ``mpo`` (MpoConfig), ``logging`` (LoggingConfig) and ``checkpoint``
(CheckpointConfig). A config file and ``TrainConfig.updated`` take the same layout::

    max_steps: 2000
    optim: {lr: 1.0e-5, lr_vision: 2.0e-6, freeze_language: true}
    data: {path: meta.json, max_packed_tokens: 4096}
    logging: {log: [tensorboard]}

A setting of the flat layout before the sections (``lr: 1.0e-5``) is a ValueError saying where it lives
now ("lr is optim.lr"). Each section checks its own fields when it is built, the errors naming the field
as ``section.field``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from ..config import InternVL3Config
from ..data import FRAME_OFFSETS, INTERNVL3_SYSTEM_MESSAGE, FrameSampling, ImageTiler, PackingConfig
from .metrics import log_backends
from .mpo import MPO_BETA, MPO_WEIGHTS


MODES = ("pretrain", "sft", "mpo")
DEVICES = ("auto", "cuda", "cpu")


class _Settings:
    """Checks shared by TrainConfig and its sections: an error names the field where a config file sets it."""

    SECTION: ClassVar[str] = ""  # the section's key in TrainConfig ("" for TrainConfig's own fields)

    def __post_init__(self):
        self._check_types()
        self._check()

    def _check_types(self) -> None:
        """TypeError naming a field set to another type than its default's (a bool, an int, a number or a
        string; fields defaulting to None or a tuple are checked by their section)."""
        for entry in dataclasses.fields(self):
            default, value = entry.default, getattr(self, entry.name)
            if value is None and ("Optional" in str(entry.type) or "None" in str(entry.type)):
                continue
            if isinstance(default, bool):
                kinds, what = (bool,), "true or false"
            elif isinstance(default, int):
                kinds, what = (int,), "an integer"
            elif isinstance(default, float):
                kinds, what = (int, float), "a number"
            elif isinstance(default, str):
                kinds, what = (str,), "a string"
            else:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)):
                raise TypeError(f"{self._name(entry.name)} must be {what}, got {value!r}")

    def _check(self) -> None:
        """The section's own rules (ValueError naming the field)."""

    def _name(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def _require(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"{self._name(name)} must be {rule}, got {getattr(self, name)!r}")

    def _at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            self._require(name, getattr(self, name) >= minimum, f">= {minimum}")


@dataclass
class OptimConfig(_Settings):
    """AdamW, its warmup + cosine schedule (to max_steps) and which components it trains. ``lr_vision``,
    ``lr_projector``, ``lr_language``: a component's peak learning rate (None: ``lr``); ``freeze_<component>``:
    not trained. The schedule is this config's also when resuming: a checkpoint's run with another
    max_steps continues on the cosine of this one."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 2e-5
    lr_vision: Optional[float] = None
    lr_projector: Optional[float] = None
    lr_language: Optional[float] = None
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def _check(self) -> None:
        self.betas = tuple(self.betas)
        self._require("lr", self.lr > 0, "> 0")
        for name in ("lr_vision", "lr_projector", "lr_language"):
            self._require(name, getattr(self, name) is None or getattr(self, name) > 0, "> 0 or None (the lr)")
        self._require("weight_decay", self.weight_decay >= 0, ">= 0")
        self._require("betas", len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas), "two numbers in [0, 1)")
        self._require("eps", self.eps > 0, "> 0")
        self._at_least(0, "warmup_steps")
        self._require("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        self._require("grad_clip", self.grad_clip > 0, "> 0")

    def component_lr(self) -> dict[str, Optional[float]]:
        return {"vision": self.lr_vision, "projector": self.lr_projector, "language": self.lr_language}

    def frozen(self) -> dict[str, bool]:
        return {"vision": self.freeze_vision, "projector": self.freeze_projector, "language": self.freeze_language}


@dataclass
class DataConfig(_Settings):
    """What a run reads and how it packs it. ``path``: a meta JSON (--data); None generates the demo data into
    ``<output_dir>/data``. ``tokenizer``: a Hugging Face tokenizer folder; None is the embedded byte
    tokenizer. ``system_message``: "internvl3" (InternVL3's), None (no system turn) or the text itself.
    ``max_num`` / ``min_num``: tiles per image (dynamic tiling), a thumbnail added when more than one.
    ``language_weight`` / ``multimodal_weight``: the mix of text-only and image datasets. ``num_workers``:
    DataLoader worker processes decoding each rank's packs (0: in the training process), each holding
    ``prefetch_factor`` steps ahead. ``video_frames``: frames sampled per video record, one tile each (the
    most a training sample takes, and what evaluation takes); ``video_min_frames``: the least a training
    sample takes, its count drawn per sample between the two (InternVL's min_num_frame / max_num_frame;
    None: always video_frames); ``video_frame_offsets``: each frame from the middle of its segment of the
    video ("middle", as transformers' processor samples) or from a random place in it ("random", as
    InternVL trains)."""

    SECTION: ClassVar[str] = "data"

    path: Optional[str] = field(default=None, metadata={"flat": "data"})
    tokenizer: Optional[str] = None
    system_message: Optional[str] = "internvl3"
    max_packed_tokens: int = 8192
    max_tiles: int = 40
    max_buffers: int = 20
    max_num: int = 12
    min_num: int = 1
    use_thumbnail: bool = True
    loss_mode: str = "square"
    overlong: str = "truncate"
    language_weight: float = 1.0
    multimodal_weight: float = 3.0
    augment: bool = True
    num_workers: int = 2
    prefetch_factor: int = 2
    video_frames: int = 8
    video_min_frames: Optional[int] = None
    video_frame_offsets: str = "middle"

    def _check(self) -> None:
        try:  # the packer's and the tiler's own checks, run now
            self.packing()
            self.tiler()
        except ValueError as error:
            raise ValueError(f"{self.SECTION}: {error}") from None
        for name in ("language_weight", "multimodal_weight"):
            self._require(name, getattr(self, name) >= 0, ">= 0")
        self._at_least(0, "num_workers")
        self._at_least(1, "prefetch_factor", "video_frames")
        self._require("video_min_frames", self.video_min_frames is None or 1 <= self.video_min_frames <= self.video_frames,
                      f"None or in [1, video_frames={self.video_frames}]")
        self._require("video_frame_offsets", self.video_frame_offsets in FRAME_OFFSETS, f"one of {FRAME_OFFSETS}")

    def packing(self, blank_tile_size: Optional[int] = None) -> PackingConfig:
        return PackingConfig(max_packed_tokens=self.max_packed_tokens, max_tiles=self.max_tiles, max_buffers=self.max_buffers,
                             overlong=self.overlong, loss_mode=self.loss_mode, blank_tile_size=blank_tile_size)

    def frame_sampling(self) -> FrameSampling:
        """The frames a training sample takes of a video."""
        least = self.video_frames if self.video_min_frames is None else self.video_min_frames
        return FrameSampling(least, self.video_frames, self.video_frame_offsets)

    def tiler(self, tile_size: Optional[int] = None) -> ImageTiler:
        sizes = {} if tile_size is None else {"tile_size": tile_size}
        return ImageTiler(min_num=self.min_num, max_num=self.max_num, use_thumbnail=self.use_thumbnail, **sizes)

    def system_text(self) -> Optional[str]:
        return INTERNVL3_SYSTEM_MESSAGE if self.system_message == "internvl3" else self.system_message


@dataclass
class MpoConfig(_Settings):
    """The MPO loss (--mode mpo): ``beta`` of its rewards, ``weights`` of its preference, quality and generation terms."""

    SECTION: ClassVar[str] = "mpo"

    beta: float = field(default=MPO_BETA, metadata={"flat": "mpo_beta"})
    weights: tuple = field(default=MPO_WEIGHTS, metadata={"flat": "mpo_weights"})

    def _check(self) -> None:
        self.weights = tuple(self.weights)
        self._require("beta", self.beta > 0, "> 0")
        self._require("weights", len(self.weights) == 3 and all(weight >= 0 for weight in self.weights),
                      "three numbers >= 0 (preference, quality, generation)")


@dataclass
class LoggingConfig(_Settings):
    """What a run reports. ``log``: metric backends beside metrics.jsonl, "tensorboard" and/or "wandb" (a list
    or a comma-separated string; model/train/metrics.py). ``eval_file``: multiple-choice questions (the
    demo's eval.jsonl format) evaluated at the end, the first ``eval_examples`` of them (None: all), under
    the V2PE delta ``eval_delta``."""

    SECTION: ClassVar[str] = "logging"

    log_every: int = 10
    log: tuple = ()
    eval_file: Optional[str] = None
    eval_examples: Optional[int] = None
    eval_delta: float = 0.25

    def _check(self) -> None:
        self.log = log_backends(self.log)
        self._at_least(1, "log_every")
        self._require("eval_examples", self.eval_examples is None or self.eval_examples >= 1, ">= 1 or None (all)")
        self._require("eval_delta", 0 < self.eval_delta <= 1, "in (0, 1]")


@dataclass
class CheckpointConfig(_Settings):
    """A checkpoint every ``save_every`` steps and at the end; the last ``keep_last`` kept (0: all);
    ``asynchronous``: written in the background while training goes on (the state copied to CPU memory at
    the save; the folder appears once complete, still atomically)."""

    SECTION: ClassVar[str] = "checkpoint"

    save_every: int = 500
    keep_last: int = 2
    asynchronous: bool = True

    def _check(self) -> None:
        self._at_least(1, "save_every")
        self._at_least(0, "keep_last")


SECTIONS = {"optim": OptimConfig, "data": DataConfig, "mpo": MpoConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig}


@dataclass
class TrainConfig(_Settings):
    """Everything a run needs; presets (model/train/presets.py), overridden by a --config file and the command line.

    ``model``: {"preset": name, "vision": {...}, "projector": {...}, "text": {...}} (fields override the
    preset's). ``init``: a save_pretrained folder to start from instead (its config wins). ``device``:
    "cuda" (one GPU per local rank), "cpu" (gloo), or "auto": cuda when available. ``autocast_dtype``: on
    CUDA (CPU runs in float32). The sections: see their classes.
    """

    mode: str = "pretrain"
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    init: Optional[str] = None
    output_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 1000
    grad_accum: int = 1
    activation_checkpointing: bool = False
    device: str = "auto"
    autocast_dtype: str = "bfloat16"
    cpu_threads: Optional[int] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mpo: MpoConfig = field(default_factory=MpoConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def _check(self) -> None:
        for key, section in SECTIONS.items():
            value = getattr(self, key)
            if not isinstance(value, section):
                setattr(self, key, _section(key, value))
        self._require("mode", self.mode in MODES, f"one of {MODES}")
        self._require("device", self.device in DEVICES, f"one of {DEVICES}")
        self._at_least(0, "max_steps")  # 0: a dry run (build, load, shard, report memory)
        self._at_least(1, "grad_accum")
        dtype = getattr(torch, self.autocast_dtype, None) if isinstance(self.autocast_dtype, str) else None
        self._require("autocast_dtype", isinstance(dtype, torch.dtype) and dtype.is_floating_point, "a torch floating dtype's name")
        self._require("cpu_threads", self.cpu_threads is None or self.cpu_threads >= 1, ">= 1 or None (torch's default)")

    def updated(self, overrides: Mapping) -> "TrainConfig":
        """A copy with ``overrides`` (the nested layout) applied: a section merges field by field, ``model``
        key by key (and one level deeper)."""
        values = dataclasses.asdict(self)
        moved = [_moved(key) for key in overrides if key not in values and _moved(key)]
        if moved:
            raise ValueError(f"config settings moved into sections: {', '.join(moved)} (a config file nests them: optim: {{lr: 1.0e-5}})")
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(values)}")
        for key, value in overrides.items():
            if key in SECTIONS:
                values[key] = {**values[key], **_section_settings(key, value)}
            elif key == "model" and isinstance(value, Mapping):
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
                given, known = settings.pop(part), [entry.name for entry in dataclasses.fields(getattr(config, part))]
                unknown = sorted(set(given) - set(known)) if isinstance(given, Mapping) else None
                if unknown is None or unknown:
                    raise ValueError(f"model.{part}: unknown settings {unknown}; known: {known}" if unknown
                                     else f"model.{part}: a mapping of its settings, got {given!r}")
                setattr(config, part, dataclasses.replace(getattr(config, part), **given))
        for key, value in settings.items():
            if not hasattr(config, key):
                raise ValueError(f"unknown model setting {key!r}")
            setattr(config, key, value)
        return config


def _moved(name: str) -> Optional[str]:
    """Where the setting ``name`` of the flat layout (or a field given in the wrong section) lives now:
    "lr is optim.lr", "max_steps is a top-level setting"; None for a name that is nowhere."""
    if name in {item.name for item in dataclasses.fields(TrainConfig)} - set(SECTIONS):
        return f"{name} is a top-level setting"
    for key, section in SECTIONS.items():
        for item in dataclasses.fields(section):
            if name in (item.name, item.metadata.get("flat")):
                return f"{name} is {key}.{item.name}"
    return None


def _section_settings(key: str, value) -> dict:
    """The settings given for the section ``key``: a mapping of its own fields."""
    if not isinstance(value, Mapping):
        hint = f" ({_moved(key)})" if _moved(key) else ""
        raise ValueError(f"{key}: a mapping of the {key} section's fields, got {value!r}{hint}")
    known = [item.name for item in dataclasses.fields(SECTIONS[key])]
    unknown = sorted(set(value) - set(known))
    if unknown:
        moved = [_moved(name) for name in unknown if _moved(name)]
        hint = f" ({', '.join(moved)})" if moved else ""
        raise ValueError(f"unknown {key} fields {unknown}{hint}; known: {known}")
    return dict(value)


def _section(key: str, value) -> _Settings:
    return SECTIONS[key](**_section_settings(key, value))


def load_config_file(path: str) -> dict:
    """A YAML or JSON mapping of TrainConfig settings (JSON is YAML, but a .json file gets JSON's errors)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of settings, got {type(data).__name__}")
    return data
