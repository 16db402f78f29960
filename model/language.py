"""The Qwen2.5 decoder on packed sequences: RMSNorm, GQA attention with q/k/v bias through the engine's
v2pe_attention (causal, Qwen2 rotary at float V2PE positions applied inside the op), SwiGLU MLP, and the
output head (untied in InternVL3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import internvl3_engine as engine

from .config import TextConfig


def activation(name: str):
    """The activation called ``name`` in transformers' ACT2FN (the subset the configs allow)."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation {name!r}")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then scaled (Qwen2's and InternViT's order)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, positions: torch.Tensor,
                context_parallel=None) -> torch.Tensor:
        """``context_parallel`` (an internvl3_engine.parallel.ContextParallel): ``x`` holds this rank's tokens
        of a pack split over ranks, and attention runs over the whole pack (its cu_seqlens and positions)."""
        tokens = x.shape[0]
        # -1: the local head counts when the projections are split by tensor parallelism
        q = self.q_proj(x).view(tokens, -1, self.head_dim)
        k = self.k_proj(x).view(tokens, -1, self.head_dim)
        v = self.v_proj(x).view(tokens, -1, self.head_dim)
        if context_parallel is not None:
            out = context_parallel.attention(q, k, v, theta=self.theta, causal=True)
        else:
            out = engine.v2pe_attention(q, k, v, cu_seqlens, max_seqlen, positions, theta=self.theta, causal=True)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, positions: torch.Tensor,
                context_parallel=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_norm(x), cu_seqlens, max_seqlen, positions, context_parallel)
        return x + self.mlp(self.post_attention_norm(x))


class LanguageModel(nn.Module):
    """Embeddings, decoder layers, final norm and the output head of Qwen2.5.

    ``forward`` runs the whole language side of a pack: token embeddings, the image rows placed over the
    ``<IMG_CONTEXT>`` embeddings, the decoder, and the loss (fused linear cross-entropy, no [T, V] logits)
    and/or the logits. Every use of the embedding and head parameters happens inside this forward, so that
    FSDP2, which gathers a component's parameters around its forward, can shard the component as one unit.
    ``decode`` maps input embeddings [T, H] to the final normed hidden states [T, H].
    With ``tie_word_embeddings`` the head shares the embedding matrix.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def decode(
        self, inputs_embeds: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, positions: torch.Tensor,
        context_parallel=None,
    ) -> torch.Tensor:
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, positions, context_parallel=context_parallel)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        positions: torch.Tensor,
        *,
        visual_rows: torch.Tensor | None = None,
        is_visual: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        loss_normalizer: float | torch.Tensor | None = None,
        loss_reduction: str = "mean",
        return_logits: bool = False,
        context_parallel=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hidden states [T, H], loss or None, logits [T, V] or None) of a pack; see InternVL3.forward."""
        embeds = self.embed_tokens(input_ids)
        if visual_rows is not None:
            embeds = engine.scatter_visual(embeds, visual_rows.to(embeds.dtype), is_visual)
        hidden = self.decode(embeds, cu_seqlens, max_seqlen, positions, context_parallel)
        loss = None
        if labels is not None:
            loss = engine.linear_cross_entropy(
                hidden, self.lm_head.weight, labels, loss_weights=loss_weights, normalizer=loss_normalizer,
                reduction=loss_reduction,
            )
        logits = self.lm_head(hidden) if return_logits else None
        return hidden, loss, logits
