"""Qwen2Attention.forward with the engine's rotary at float (V2PE) position_ids."""

from __future__ import annotations

import torch

import internvl3_engine as engine

from .attention import ATTENTION_IMPLEMENTATION, _ROTARY_THETA, _flat_positions, _pop_cache


def _rotated(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Qwen2 rotary of x [B, H, S, D] at float32 position_ids [B or 1, S] through the engine's apply_rotary."""
    batch, heads, seq, dim = x.shape
    positions = _flat_positions(position_ids, batch, seq, x.device)
    flat = x.transpose(1, 2).reshape(batch * seq, heads, dim)
    return engine.apply_rotary(flat, positions, theta).view(batch, seq, heads, dim).transpose(1, 2)


def _qwen2_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Qwen2Attention.forward with the engine's rotary at float position_ids: inside v2pe_attention when the
    attention is the engine's and all keys are this call's, else apply_rotary; the KV cache gets rotated keys
    (through the cache's own ``update``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2 import modeling_qwen2

    cache = _pop_cache(kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    theta = self.internvl3_engine_rope_theta
    position_ids = kwargs.get("position_ids")
    engine_attention = self.config._attn_implementation == ATTENTION_IMPLEMENTATION
    extra = {}
    if position_ids is None:
        # Called outside a Qwen2Model (which always passes position_ids): transformers' cos/sin.
        cos, sin = position_embeddings
        query, key = modeling_qwen2.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
    elif cache is not None:
        cached_key, value = cache.update(_rotated(key, position_ids, theta), value, self.layer_idx)
        if engine_attention and cached_key.shape[2] == query.shape[2]:
            # Every key is this call's (prefill): the cache holds them rotated, the op rotates its own copy.
            extra[_ROTARY_THETA] = theta
        else:
            query, key = _rotated(query, position_ids, theta), cached_key
    elif engine_attention:
        extra[_ROTARY_THETA] = theta
    else:
        query, key = _rotated(query, position_ids, theta), _rotated(key, position_ids, theta)

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, modeling_qwen2.eager_attention_forward)
    out, weights = attention(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        sliding_window=self.sliding_window, **kwargs, **extra,
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights
