"""InternVL's projector with the pixel shuffle fused into its LayerNorm."""

from __future__ import annotations

import math

import torch

import internvl3_engine as engine


def _unshuffled(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVLModel.pixel_shuffle, patched: the features pass through unshuffled; the patched projector
    shuffles them fused with its LayerNorm."""
    return vision_features


def _projector_forward(self, image_features: torch.Tensor) -> torch.Tensor:
    """InternVLMultiModalProjector.forward, patched: features of the vision width [B, h*w, C] (square grid) go
    through pixel_unshuffle_layernorm; features already shuffled [B, rows, r*r*C] through the plain LayerNorm."""
    norm = self.layer_norm
    if image_features.shape[-1] == norm.normalized_shape[0]:
        rows = norm(image_features)
    else:
        batch, count, channels = image_features.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"the vision features of a tile must form a square grid, got {count} per tile")
        rows = engine.pixel_unshuffle_layernorm(
            image_features.reshape(batch, side, side, channels), norm.weight, norm.bias, norm.eps,
            scale_factor=self.internvl3_engine_downsample_ratio,
        )
    return self.linear_2(self.act(self.linear_1(rows)))
