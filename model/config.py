"""InternVL3 configuration: the vision tower (InternViT), the projector (pixel unshuffle + MLP) and the language
model (Qwen2.5), with the published presets and conversion from/to transformers' InternVL config.json and the
original OpenGVLab (InternVLChatModel) config.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

from internvl3_engine.architectures import INTERNVL3_IMG_CONTEXT_ID, preset_config
from internvl3_engine.architectures import PRESETS as PUBLISHED_PRESETS

NORM_TYPES = ("layer_norm", "rms_norm")
# Activations the model implements (names as transformers' ACT2FN spells them).
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "silu")


@dataclass
class VisionConfig:
    """InternViT. ``qk_norm`` is an RMSNorm over the full q (and k) width before the heads are split;
    ``final_norm`` is transformers' ``use_mean_pooling=False`` LayerNorm after the last layer (InternVL3's
    checkpoints have none)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: float = 0.1
    hidden_act: str = "gelu"
    final_norm: bool = False

    def __post_init__(self):
        _check_positive(self, ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size"))
        _check_multiple(self, "vision", "hidden_size", "num_heads")
        _check_multiple(self, "vision", "image_size", "patch_size")
        _check_choice(self, "vision", "norm_type", NORM_TYPES)
        _check_choice(self, "vision", "hidden_act", ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches along each side of a tile."""
        return self.image_size // self.patch_size


@dataclass
class ProjectorConfig:
    """``mlp1``: pixel unshuffle by ``downsample_ratio`` -> LayerNorm(norm_eps) -> Linear -> act -> Linear."""

    downsample_ratio: float = 0.5
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"

    def __post_init__(self):
        factor = 1.0 / self.downsample_ratio if self.downsample_ratio > 0 else 0.0
        if not (factor >= 1 and factor == int(factor)):
            raise ValueError(f"downsample_ratio must be 1/r for an integer r >= 1, got {self.downsample_ratio}")
        _check_choice(self, "projector", "hidden_act", ACTIVATIONS)

    @property
    def factor(self) -> int:
        return int(round(1.0 / self.downsample_ratio))


@dataclass
class TextConfig:
    """Qwen2.5 decoder: RMSNorm, GQA with q/k/v bias, SwiGLU, rotary (here V2PE positions) with ``rope_theta``."""

    vocab_size: int = 151674
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _check_positive(
            self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        )
        _check_multiple(self, "text", "hidden_size", "num_heads")
        _check_multiple(self, "text", "num_heads", "num_kv_heads")
        _check_choice(self, "text", "hidden_act", ACTIVATIONS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# model.data.ByteTokenizer's <IMG_CONTEXT> (256 + its index among the special tokens), for the tiny preset.
BYTE_TOKENIZER_VOCAB = 262
BYTE_TOKENIZER_IMG_CONTEXT_ID = 261


@dataclass
class InternVL3Config:
    """The whole model. ``image_token_id`` is the ``<IMG_CONTEXT>`` id whose embeddings the projected image rows
    replace; ``name`` is the preset (or checkpoint) it came from, informational only."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = INTERNVL3_IMG_CONTEXT_ID
    name: str = "custom"

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig(**self.projector)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.vision.grid_size % self.projector.factor:
            raise ValueError(
                f"the patch grid ({self.vision.grid_size}) must be a multiple of the unshuffle factor "
                f"({self.projector.factor})"
            )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")

    @property
    def tokens_per_tile(self) -> int:
        """``<IMG_CONTEXT>`` tokens per tile: (image_size / patch_size / r)^2 (256 for InternVL3)."""
        return (self.vision.grid_size // self.projector.factor) ** 2

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * self.projector.factor**2

    # ---- presets

    @classmethod
    def preset(cls, name: str) -> "InternVL3Config":
        """A fresh config of preset ``name`` (one of ``PRESETS``)."""
        if name == TINY_PRESET:
            return cls(vision=_tiny_vision(), projector=ProjectorConfig(), text=_tiny_text(),
                       image_token_id=BYTE_TOKENIZER_IMG_CONTEXT_ID, name=name)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
        return cls.from_hf(preset_config(name))

    # ---- plain dictionaries (this project's own format)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "InternVL3Config":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    # ---- transformers' InternVL config.json

    @classmethod
    def from_hf(cls, config: Union[dict, str, os.PathLike]) -> "InternVL3Config":
        """From a transformers ``InternVLConfig`` (its ``to_dict()``, a config.json path, or the folder holding
        it). Also accepts the original OpenGVLab ``InternVLChatModel`` config.json (``llm_config``)."""
        data = _read_json(config)
        if "llm_config" in data:
            return _from_opengvlab(data)
        if data.get("model_type") not in (None, "internvl"):
            raise ValueError(f"expected an InternVL config (model_type 'internvl'), got {data.get('model_type')!r}")
        if data.get("vision_feature_layer", -1) != -1:
            raise ValueError("only vision_feature_layer = -1 (the last layer) is supported")
        if data.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("only vision_feature_select_strategy 'default' (CLS dropped) is supported")
        vision = data.get("vision_config") or {}
        text = data.get("text_config") or {}
        return cls(
            vision=_vision_config_from(
                vision,
                vision.get("image_size", 448),
                norm_type=vision.get("norm_type", "layer_norm"),
                # transformers' InternVLVisionConfig defaults attention_bias to False
                qkv_bias=vision.get("attention_bias", False),
                qk_norm=vision.get("use_qk_norm", False),
                layer_scale_init=vision.get("layer_scale_init_value", 0.1),
                final_norm=not vision.get("use_mean_pooling", True),
            ),
            projector=ProjectorConfig(
                downsample_ratio=data.get("downsample_ratio", 0.5),
                hidden_act=data.get("projector_hidden_act", "gelu"),
            ),
            # transformers ties InternVL's head to the embeddings when the top-level flag says so
            # (InternVLConfig defaults it to True)
            text=_text_config_from_qwen2(text, tie_word_embeddings=bool(data.get("tie_word_embeddings", True))),
            image_token_id=data.get("image_token_id", INTERNVL3_IMG_CONTEXT_ID),
            name=str(data.get("_name_or_path") or "custom"),
        )

    def to_hf(self) -> dict:
        """A transformers ``InternVLConfig`` dict (config.json of InternVLForConditionalGeneration)."""
        v, p, t = self.vision, self.projector, self.text
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "downsample_ratio": p.downsample_ratio,
            "image_seq_length": self.tokens_per_tile,
            "image_token_id": self.image_token_id,
            "projector_hidden_act": p.hidden_act,
            "tie_word_embeddings": t.tie_word_embeddings,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "vision_config": {
                "model_type": "internvl_vision",
                "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "image_size": [v.image_size, v.image_size],
                "patch_size": [v.patch_size, v.patch_size],
                "num_channels": v.num_channels,
                "norm_type": v.norm_type,
                "layer_norm_eps": v.norm_eps,
                "attention_bias": v.qkv_bias,
                "use_qk_norm": v.qk_norm,
                "layer_scale_init_value": v.layer_scale_init,
                "hidden_act": v.hidden_act,
                "use_mean_pooling": not v.final_norm,
                "use_absolute_position_embeddings": True,
            },
            "text_config": _qwen2_config_dict(
                t, {"rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"}}
            ),
        }

    def to_opengvlab(self) -> dict:
        """The original OpenGVLab ``InternVLChatModel`` config.json."""
        v, p, t = self.vision, self.projector, self.text
        return {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "downsample_ratio": p.downsample_ratio,
            "force_image_size": v.image_size,
            "ps_version": "v2",
            "select_layer": -1,
            "template": "internvl2_5",
            "vision_config": {
                "architectures": ["InternVisionModel"],
                "model_type": "intern_vit_6b",
                "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "norm_type": v.norm_type,
                "layer_norm_eps": v.norm_eps,
                "qkv_bias": v.qkv_bias,
                "qk_normalization": v.qk_norm,
                "initializer_factor": v.layer_scale_init,
                "hidden_act": v.hidden_act,
            },
            "llm_config": {
                "architectures": ["Qwen2ForCausalLM"],
                **_qwen2_config_dict(t, {"rope_theta": t.rope_theta}),
            },
            # Not a field of InternVLChatModel's config (its tokenizer fixes the id); kept for round trips.
            "img_context_token_id": self.image_token_id,
        }


def _from_opengvlab(data: dict) -> InternVL3Config:
    vision = data.get("vision_config") or {}
    text = data["llm_config"]
    if data.get("select_layer", -1) != -1:
        raise ValueError("only select_layer = -1 (the last layer) is supported")
    if data.get("ps_version", "v2") != "v2":
        raise ValueError("only ps_version 'v2' pixel shuffle is supported")
    image_size = data.get("force_image_size") or vision.get("image_size", 448)
    return InternVL3Config(
        vision=_vision_config_from(
            vision,
            image_size,
            norm_type=vision.get("norm_type", "rms_norm"),
            qkv_bias=vision.get("qkv_bias", False),
            qk_norm=vision.get("qk_normalization", False),
            layer_scale_init=vision.get("initializer_factor", 0.1),
        ),
        projector=ProjectorConfig(downsample_ratio=data.get("downsample_ratio", 0.5)),
        text=_text_config_from_qwen2(text, tie_word_embeddings=bool(text.get("tie_word_embeddings", False))),
        image_token_id=data.get("img_context_token_id") or INTERNVL3_IMG_CONTEXT_ID,
        name=str(data.get("_name_or_path") or "custom"),
    )


def _read_json(config: Union[dict, str, os.PathLike]) -> dict:
    if isinstance(config, dict):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a dict or a path, got {type(config).__name__}")
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {name} is supported, got {value}")
        value = value[0]
    return int(value)


def _rope_theta(text: dict) -> float:
    parameters = text.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", text.get("rope_theta", 10000.0)))


def _check_rope(text: dict) -> None:
    # transformers <= 4 writes rope_scaling, 5 writes rope_parameters; only plain rotary is V2PE's.
    for key in ("rope_parameters", "rope_scaling"):
        kind = (text.get(key) or {}).get("rope_type", (text.get(key) or {}).get("type", "default"))
        if kind != "default":
            raise ValueError(f"only default rotary embeddings are supported, got {key}.rope_type {kind!r}")


def _vision_config_from(vision: dict, image_size: Any, **layout_fields) -> VisionConfig:
    """VisionConfig from a vision_config dict (transformers' or OpenGVLab's): the keys both layouts name
    alike are read here; ``image_size`` (OpenGVLab may force it outside vision_config) and the fields each
    layout names its own way (``layout_fields``) come from the caller."""
    return VisionConfig(
        hidden_size=vision.get("hidden_size", 1024),
        num_layers=vision.get("num_hidden_layers", 24),
        num_heads=vision.get("num_attention_heads", 16),
        intermediate_size=vision.get("intermediate_size", 4096),
        image_size=_square(image_size, "image_size"),
        patch_size=_square(vision.get("patch_size", 14), "patch_size"),
        num_channels=vision.get("num_channels", 3),
        norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu"),
        **layout_fields,
    )


def _qwen2_config_dict(t: TextConfig, rope: dict) -> dict:
    """The Qwen2 config dict of ``t`` (transformers' text_config, OpenGVLab's llm_config); ``rope`` is the
    rotary entry, which the two layouts spell differently."""
    return {
        "model_type": "qwen2",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size,
        "rms_norm_eps": t.rms_norm_eps,
        **rope,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False,
    }


def _text_config_from_qwen2(text: dict, tie_word_embeddings: bool) -> TextConfig:
    """TextConfig from a Qwen2 config dict (transformers' text_config, OpenGVLab's llm_config); where the
    head-tying flag lives differs between the two layouts, so the caller reads it."""
    if text.get("model_type", "qwen2") != "qwen2":
        raise ValueError(f"only a Qwen2 language model is supported, got {text.get('model_type')!r}")
    if text.get("use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    _check_rope(text)
    return TextConfig(
        vocab_size=text.get("vocab_size", 151936),
        hidden_size=text.get("hidden_size", 4096),
        num_layers=text.get("num_hidden_layers", 32),
        num_heads=text.get("num_attention_heads", 32),
        num_kv_heads=text.get("num_key_value_heads") or text.get("num_attention_heads", 32),
        intermediate_size=text.get("intermediate_size", 22016),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(text),
        hidden_act=text.get("hidden_act", "silu"),
        max_position_embeddings=text.get("max_position_embeddings", TextConfig.max_position_embeddings),
        tie_word_embeddings=tie_word_embeddings,
    )


def _check_positive(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def _check_multiple(config, what: str, name: str, divisor_name: str) -> None:
    value, divisor = getattr(config, name), getattr(config, divisor_name)
    if value % divisor:
        raise ValueError(f"{what} {name} {value} must be a multiple of {divisor_name} {divisor}")


def _check_choice(config, what: str, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{what} {name} must be one of {choices}, got {value!r}")


# ---- presets: the published ones are internvl3_engine.planner's table (transformers layout); "tiny" is this
# model's own: seconds on a CPU, 56x56 tiles of 14x14 patches -> 4x4 patches -> 4 <IMG_CONTEXT> tokens a
# tile, and model.data.ByteTokenizer's vocabulary and image token.

TINY_PRESET = "tiny"


def _tiny_vision() -> VisionConfig:
    return VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=56, patch_size=14)


def _tiny_text() -> TextConfig:
    return TextConfig(
        vocab_size=BYTE_TOKENIZER_VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, rope_theta=1e6,
    )


PRESETS = (TINY_PRESET,) + PUBLISHED_PRESETS
