"""InternVL3's published architectures as transformers ``InternVLConfig`` dicts (the config.json layout of
``InternVLForConditionalGeneration``), the one table of their shapes (shared/reference/internvl3-facts.md).

The reference model (model/config.py) builds its presets from these with ``InternVL3Config.from_hf``."""

from __future__ import annotations

import copy

INTERNVL3_VOCAB = 151674  # Qwen2.5's vocabulary plus InternVL's special tokens
INTERNVL3_IMG_CONTEXT_ID = 151667

INTERNVIT_300M = {
    "model_type": "internvl_vision",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "num_channels": 3,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "attention_bias": True,
    "use_qk_norm": False,
    "layer_scale_init_value": 0.1,
    "hidden_act": "gelu",
    "use_mean_pooling": True,  # no LayerNorm after the last layer
    "use_absolute_position_embeddings": True,
}
INTERNVIT_6B = {
    **INTERNVIT_300M,
    "hidden_size": 3200,
    "num_hidden_layers": 45,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "norm_type": "rms_norm",
    "attention_bias": False,
    "use_qk_norm": True,
}


def _qwen25(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": INTERNVL3_VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": ffn,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    }


def _internvl3(name: str, vision: dict, text: dict) -> dict:
    return {
        "_name_or_path": name,
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": 256,  # (448 / 14 / 2)^2 tokens a tile after the pixel unshuffle
        "image_token_id": INTERNVL3_IMG_CONTEXT_ID,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "vision_config": copy.deepcopy(vision),
        "text_config": text,
    }


_PUBLISHED = {
    "internvl3-1b": (INTERNVIT_300M, _qwen25(896, 24, 14, 2, 4864)),
    "internvl3-2b": (INTERNVIT_300M, _qwen25(1536, 28, 12, 2, 8960)),
    "internvl3-8b": (INTERNVIT_300M, _qwen25(3584, 28, 28, 4, 18944)),
    "internvl3-14b": (INTERNVIT_300M, _qwen25(5120, 48, 40, 8, 13824)),
    "internvl3-38b": (INTERNVIT_6B, _qwen25(5120, 64, 40, 8, 27648)),
    "internvl3-78b": (INTERNVIT_6B, _qwen25(8192, 80, 64, 8, 29568)),
}
PRESETS = tuple(_PUBLISHED)


def preset_config(name: str) -> dict:
    """A fresh transformers InternVLConfig dict of the published preset ``name`` (one of ``PRESETS``)."""
    if name not in _PUBLISHED:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    vision, text = _PUBLISHED[name]
    return _internvl3(name, vision, copy.deepcopy(text))
