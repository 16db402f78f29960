"""ModelShape: what the FLOP and memory models need to know about an InternVL-style model, per component.

Dimensions come from the transformers ``InternVLConfig`` dict (the layout of internvl3_engine.architectures
and of a checkpoint's config.json); parameter counts come from real modules, so they hold for any
implementation: ``model_shape`` builds transformers' InternVLForConditionalGeneration on the meta device
(shapes only, nothing allocated: the 78B in well under a second), ``ModelShape.from_modules`` counts the
modules of a model already built (the reference model passes its own).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from ..parallel.parallelize import find_blocks, find_components
from ..architectures import PRESETS, preset_config

# Vision parameters that are added to (not multiplied with) each token: they cost no matmul FLOPs.
_VISION_ADDITIVE_NAMES = ("cls_token", "mask_token", "position_embedding", "position_embeddings")


@dataclass(frozen=True)
class ComponentShape:
    """Parameter counts of one component (vision tower, projector or language model).

    parameters: all of them (what memory holds; a tied head counted once).
    matmul_parameters: those each of the component's tokens multiplies (6 FLOPs each in training): the
      vision tower without its position embedding and CLS token, the language model without its input
      embedding table but with its output head (again when tied to the embeddings).
    blocks / block_parameters: the transformer blocks (FSDP's per-block units) and the parameters of one;
      0 for the projector.
    """

    parameters: int
    matmul_parameters: int
    blocks: int
    block_parameters: int

    @property
    def root_parameters(self) -> int:
        """Parameters outside the blocks (embeddings, final norm, output head): one FSDP unit."""
        return self.parameters - self.blocks * self.block_parameters


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of an InternVL model (ViT -> pixel unshuffle -> MLP projector -> LLM)."""

    name: str
    vision: ComponentShape
    projector: ComponentShape
    language: ComponentShape
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    vision_tokens_per_tile: int  # patches + the CLS token
    tokens_per_tile: int  # <IMG_CONTEXT> tokens a tile after the pixel unshuffle
    projector_in_features: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_head: bool

    def component(self, name: str) -> ComponentShape:
        return getattr(self, name)

    @classmethod
    def from_modules(
        cls, config: dict, model: nn.Module, components: dict[str, nn.Module] | None = None, name: str | None = None
    ) -> "ModelShape":
        """From a transformers InternVLConfig dict and the built ``model`` (meta or real, before sharding);
        ``components`` as parallelize.find_components takes them. Parameters outside every component (the
        head of transformers' InternVLForConditionalGeneration) count to the language model."""
        found = find_components(model, components)
        vision_cfg, text_cfg = config.get("vision_config") or {}, config.get("text_config") or {}
        counted: set[int] = set()
        counts = {}
        for component_name, module in found.items():
            counts[component_name] = _count(module.parameters(), counted)
        outside = _count(model.parameters(), counted)
        counts["language"] += outside

        vision_additive = sum(
            parameter.numel() for parameter_name, parameter in found["vision"].named_parameters()
            if parameter_name.rsplit(".", 1)[-1] in _VISION_ADDITIVE_NAMES
        )
        embeddings = [module for module in found["language"].modules() if isinstance(module, nn.Embedding)]
        if len(embeddings) != 1:
            raise ValueError(f"expected one input embedding in the language model, found {len(embeddings)}")
        embedding = embeddings[0].weight
        tied = any(isinstance(module, nn.Linear) and module.weight is embedding for module in model.modules())
        # The input embedding is a lookup, not a matmul; a head tied to it still multiplies every token.
        language_matmul = counts["language"] - (0 if tied else embedding.numel())

        image_size = _side(vision_cfg.get("image_size", 448))
        patch_size = _side(vision_cfg.get("patch_size", 14))
        factor = round(1 / config.get("downsample_ratio", 0.5))
        grid = image_size // patch_size
        vision_hidden = vision_cfg.get("hidden_size", 1024)
        heads = text_cfg.get("num_attention_heads", 32)
        hidden = text_cfg.get("hidden_size", 4096)
        return cls(
            name=name or str(config.get("_name_or_path") or "custom"),
            vision=_component(found["vision"], counts["vision"], counts["vision"] - vision_additive),
            projector=_component(found["projector"], counts["projector"], counts["projector"]),
            language=_component(found["language"], counts["language"], language_matmul),
            vision_layers=vision_cfg.get("num_hidden_layers", 24),
            vision_hidden=vision_hidden,
            vision_heads=vision_cfg.get("num_attention_heads", 16),
            vision_intermediate=vision_cfg.get("intermediate_size", 4096),
            vision_tokens_per_tile=grid * grid + 1,
            tokens_per_tile=(grid // factor) ** 2,
            projector_in_features=vision_hidden * factor * factor,
            layers=text_cfg.get("num_hidden_layers", 32),
            hidden=hidden,
            heads=heads,
            kv_heads=text_cfg.get("num_key_value_heads") or heads,
            head_dim=text_cfg.get("head_dim") or hidden // heads,
            intermediate=text_cfg.get("intermediate_size", 22016),
            vocab=text_cfg.get("vocab_size", 151936),
            tied_head=tied,
        )


def _count(parameters, counted: set[int]) -> int:
    """Elements of the parameters not seen before (a tied weight is one tensor, counted once)."""
    total = 0
    for parameter in parameters:
        if id(parameter) not in counted:
            counted.add(id(parameter))
            total += parameter.numel()
    return total


def _component(module: nn.Module, parameters: int, matmul_parameters: int) -> ComponentShape:
    blocks = find_blocks(module)
    if blocks is None:
        return ComponentShape(parameters, matmul_parameters, 0, 0)
    return ComponentShape(parameters, matmul_parameters, len(blocks), sum(p.numel() for p in blocks[0].parameters()))


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def read_config(source: Union[str, os.PathLike, dict]) -> dict:
    """A transformers InternVLConfig dict from a preset name, a config.json path (or its folder), or a dict."""
    if isinstance(source, dict):
        return source
    if isinstance(source, str) and source in PRESETS:
        return preset_config(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        if not os.path.exists(os.fspath(source)):
            raise FileNotFoundError(f"config {os.fspath(source)}: no such file or folder (nor a preset: {', '.join(PRESETS)})")
        raise ValueError(f"config {os.fspath(source)}: a folder without config.json (a preset is one of {', '.join(PRESETS)})")
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"config {path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("model_type") != "internvl":
        model_type = data.get("model_type") if isinstance(data, dict) else None
        raise ValueError(f"config {path} is not a transformers InternVL config (model_type {model_type!r})")
    return data


def model_shape(source: Union[str, os.PathLike, dict]) -> ModelShape:
    """The ModelShape of a preset, a transformers InternVL config.json (path or folder) or its dict, counted
    on transformers' InternVLForConditionalGeneration built on the meta device."""
    config = read_config(source)
    try:
        from transformers import InternVLConfig, InternVLForConditionalGeneration
    except ImportError as error:
        raise ImportError(
            "the parallelism planner builds the model with transformers' InternVL: pip install transformers"
        ) from error
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(InternVLConfig.from_dict(config))
    return ModelShape.from_modules(config, model)
