"""Model FLOPs of one training step (forward + backward) of an InternVL model on one packed micro-batch.

The formula (performance-anchors.md; the optimizer update and the norms are not counted):
  6 * N_llm * T                            the LLM's matmuls, N_llm = ModelShape.language.matmul_parameters
                                           (no input embedding table; the output head, tied or not)
  + 12 * layers * heads * head_dim * sum(L_i^2) / 2
                                           the LLM's attention (QK^T and PV, x3 for training, causal halves)
  + tiles * (6 * N_vit * S + 12 * vit_layers * vit_hidden * S^2)
                                           the ViT per tile of S = patches + 1 tokens (bidirectional), N_vit
                                           without the position embedding and CLS token
  + tiles * 6 * N_projector * tokens_per_tile
Activation checkpointing's recomputation is not model FLOPs (MFU does not count it).
"""

from __future__ import annotations

from typing import Iterable

from .shape import ModelShape


def training_flops(shape: ModelShape, tokens: int, tiles: int, sample_lengths: Iterable[int]) -> dict[str, float]:
    """FLOPs of forward + backward on a pack of ``tokens`` tokens in samples of ``sample_lengths`` with
    ``tiles`` image tiles, by part (llm_matmuls, llm_attention, vit_matmuls, vit_attention, projector) and
    their ``total``."""
    squares = sum(length * length for length in sample_lengths)
    tile_tokens = shape.vision_tokens_per_tile
    parts = {
        "llm_matmuls": 6.0 * shape.language.matmul_parameters * tokens,
        "llm_attention": 12.0 * shape.layers * shape.heads * shape.head_dim * squares / 2,
        "vit_matmuls": 6.0 * tiles * shape.vision.matmul_parameters * tile_tokens,
        "vit_attention": 12.0 * tiles * shape.vision_layers * shape.vision_hidden * tile_tokens**2,
        "projector": 6.0 * tiles * shape.projector.matmul_parameters * shape.tokens_per_tile,
    }
    return {**parts, "total": sum(parts.values())}
