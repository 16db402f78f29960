"""InternViT: patch embedding, CLS token, learned absolute position embedding, pre-norm layers with layer scale
and bidirectional attention. The tiles of a batch run as one pack through the engine's v2pe_attention
(each tile one segment of 1 + patches tokens, no rotary, not causal)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import internvl3_engine as engine

from .config import VisionConfig
from .language import RMSNorm, activation


def make_norm(config: VisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class VisionEmbeddings(nn.Module):
    """Conv patch embedding, a CLS token in front, plus the position embedding learned for ``image_size``
    (bicubically resized when a tile has another size)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.grid_size = config.grid_size
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + config.grid_size**2, config.hidden_size))

    def position_embeddings_for(self, rows: int, cols: int) -> torch.Tensor:
        """[1, 1 + rows*cols, C]: the CLS position, then the patch grid resized to rows x cols."""
        if rows == cols == self.grid_size:
            return self.position_embedding
        cls_position = self.position_embedding[:, :1]
        grid = self.position_embedding[:, 1:].reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        # Resized in float32: bicubic interpolation is not implemented for half precision on every device.
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        grid = grid.to(self.position_embedding.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls_position, grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """pixel_values [N, 3, H, W] -> ([N, 1 + h*w, C], h, w) with h = H / patch, w = W / patch."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        tiles, channels, rows, cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tiles, 1, channels), patches], dim=1)
        return tokens + self.position_embeddings_for(rows, cols), rows, cols


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(width, width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(width, width, bias=config.qkv_bias)
        self.out_proj = nn.Linear(width, width)
        # InternViT-6B normalizes q and k over the full width, before splitting the heads; transformers'
        # port fixes this norm's eps at 1e-6 whatever layer_norm_eps says, and so does this model.
        self.q_norm = RMSNorm(width, 1e-6) if config.qk_norm else None
        self.k_norm = RMSNorm(width, 1e-6) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (tokens, self.num_heads, self.head_dim)
        out = engine.v2pe_attention(q.view(shape), k.view(shape), v.view(shape), cu_seqlens, max_seqlen, None, causal=False)
        return self.out_proj(out.reshape(tokens, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)): pre-norm with per-channel layer scale."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = VisionAttention(config)
        self.ls1 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))
        self.norm2 = make_norm(config)
        self.mlp = VisionMLP(config)
        self.ls2 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternViT(nn.Module):
    """pixel_values [N, 3, H, W] (one tile each) -> last-layer patch features [N, H/14, W/14, C], CLS dropped."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps) if config.final_norm else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [tiles, {self.config.num_channels}, H, W], got shape {tuple(pixel_values.shape)}"
            )
        tokens, rows, cols = self.embeddings(pixel_values)
        tiles, per_tile, width = tokens.shape
        # Every tile is one segment of the pack: attention stays within a tile.
        cu_seqlens = torch.arange(0, (tiles + 1) * per_tile, per_tile, dtype=torch.int32, device=tokens.device)
        x = tokens.reshape(tiles * per_tile, width)
        for layer in self.layers:
            x = layer(x, cu_seqlens, per_tile)
        patches = x.view(tiles, per_tile, width)[:, 1:].unflatten(1, (rows, cols))  # CLS dropped: a view of x
        # The result must be a tensor of its own, not a view (FSDP2 warns of returned views: an in-place op
        # on one would skip its all-gather). The final norm writes one (and skips the CLS rows); without it,
        # a contiguous copy, which the projector's pixel unshuffle would otherwise make of several tiles.
        if self.final_norm is not None:
            return self.final_norm(patches)
        return patches.clone(memory_format=torch.contiguous_format)
