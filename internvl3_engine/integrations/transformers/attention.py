"""The engine's attention as a transformers attention function: packing a [B, S] batch into v2pe_attention's
varlen segments, the attention over a KV cache when decoding, the mask function that keeps the 2-D mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import internvl3_engine as engine


ATTENTION_IMPLEMENTATION = "internvl3_engine"
# The keyword argument through which a decoder hands its layers the packing it computed once per forward.
_PACKING = "internvl3_engine_packing"
# The keyword argument through which a patched Qwen2 attention asks the attention function for rotary.
_ROTARY_THETA = "internvl3_engine_rotary_theta"
# transformers' names for the KV cache argument: "cache" from 5.24, "past_key_values" before (still accepted).
_CACHE_NAMES = ("cache", "past_key_values")


# ---- packing


@dataclass
class _Packing:
    """The tokens of a [B, S] batch as v2pe_attention takes them: ``index`` the flat indices (into B*S) of the
    kept tokens (None: all of them) and their segments ``cu_seqlens`` / ``max_seqlen``."""

    index: Optional[torch.Tensor]
    cu_seqlens: torch.Tensor
    max_seqlen: int


def _flat_positions(position_ids: torch.Tensor, batch: int, seq: int, device) -> torch.Tensor:
    """float32 [B*S] position_ids (given [B, S] or [1, S]), fractional V2PE positions kept as they are."""
    return position_ids.to(device).expand(batch, seq).reshape(batch * seq).to(torch.float32)


def _packing(batch: int, seq: int, device, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None) -> _Packing:
    tokens = batch * seq
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != tokens:
            raise ValueError(f"cu_seqlens must be 1-D and end at the batch's {tokens} tokens, got {cu_seqlens.tolist()}")
        longest = engine.max_seqlen(cu_seqlens) if max_seqlen is None else int(max_seqlen)
        return _Packing(None, cu_seqlens, longest)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"the {ATTENTION_IMPLEMENTATION} attention unpads from a 2-D attention_mask [B, S]; got shape "
                f"{tuple(attention_mask.shape)} (pass the 2-D padding mask, or cu_seqlens)"
            )
        keep = attention_mask[:, -seq:].to(device=device, dtype=torch.bool)
        lengths = keep.sum(dim=1)
        index = None if bool(keep.all()) else keep.reshape(tokens).nonzero().squeeze(1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return _Packing(index, cu_seqlens, int(lengths.max()) if batch else 0)
    starts = torch.zeros(tokens, dtype=torch.bool, device=device)
    starts[::max(seq, 1)] = True
    if position_ids is not None and tokens > 1:
        positions = _flat_positions(position_ids, batch, seq, device)
        starts[1:] |= positions[1:] <= positions[:-1]
    boundaries = torch.cat([starts.nonzero().squeeze(1), torch.tensor([tokens], device=device)]).to(torch.int32)
    longest = int((boundaries[1:] - boundaries[:-1]).max()) if boundaries.shape[0] > 1 else 0
    return _Packing(None, boundaries, longest)


def _cache_given(kwargs) -> bool:
    return any(kwargs.get(name) is not None for name in _CACHE_NAMES)


def _pop_cache(kwargs):
    """The KV cache among the keyword arguments (removed from them), under either of transformers' names."""
    caches = [kwargs.pop(name, None) for name in _CACHE_NAMES]
    return next((cache for cache in caches if cache is not None), None)


def _pack_before_decoder(module, args, kwargs):
    """Forward pre-hook of a patched decoder: computes the packing once for all its layers (host syncs happen
    here, not per layer). Skipped with a KV cache given (decoding), where the attention works it out."""
    if _cache_given(kwargs) or _PACKING in kwargs:
        return None
    reference = kwargs.get("inputs_embeds")
    if reference is None:
        reference = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if reference is None or (mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2)):
        return None
    batch, seq = reference.shape[:2]
    kwargs[_PACKING] = _packing(
        batch, seq, reference.device, mask, kwargs.get("position_ids"), _cu_seqlens_kwarg(kwargs), _max_seqlen_kwarg(kwargs)
    )
    return args, kwargs


def _cu_seqlens_kwarg(kwargs):
    given = kwargs.get("cu_seqlens")
    return kwargs.get("cu_seq_lens_q") if given is None else given


def _max_seqlen_kwarg(kwargs):
    given = kwargs.get("max_seqlen")
    return kwargs.get("max_length_q") if given is None else given


# ---- attention


def _attention_over_cache(query, key, value, attention_mask, scaling, causal):
    """Plain attention of the last S positions' queries [B, Hq, S, D] over Sk >= S keys [B, Hk, Sk, D] (a KV
    cache), GQA, float32 softmax; the 2-D padding mask hides keys. Returns [B, S, Hq, D]."""
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1).float()
    values = value.repeat_interleave(groups, dim=1).float()
    scores = query.float() @ keys.transpose(-1, -2) * scaling
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    if causal:
        steps = torch.arange(k_len, device=query.device)
        allowed = steps[None, :] <= steps[-q_len:, None]
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -k_len:].to(torch.bool)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return (weights @ values).to(query.dtype).transpose(1, 2).contiguous()


def engine_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function interface: query [B, Hq, S, D], key and value [B, Hk, Sk, D] ->
    ([B, S, Hq, D], None). Runs v2pe_attention on the unpadded, packed tokens (see the module docstring for
    where the boundaries come from); with ``internvl3_engine_rotary_theta`` it applies Qwen2's rotary at the
    float position_ids inside the op."""
    if dropout:
        raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no dropout; set attention_dropout to 0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no sliding window")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    batch, q_heads, seq, dim = query.shape
    if scaling is None:
        scaling = dim**-0.5
    if key.shape[2] != seq:
        return _attention_over_cache(query, key, value, attention_mask, scaling, causal), None

    packing = kwargs.get(_PACKING)
    if packing is None:
        packing = _packing(batch, seq, query.device, attention_mask, kwargs.get("position_ids"),
                           _cu_seqlens_kwarg(kwargs), _max_seqlen_kwarg(kwargs))
    tokens = batch * seq
    q, k, v = (x.transpose(1, 2).reshape(tokens, x.shape[1], dim) for x in (query, key, value))
    if packing.index is not None:
        q, k, v = q[packing.index], k[packing.index], v[packing.index]
    theta = kwargs.get(_ROTARY_THETA)
    rotary, positions = {}, None
    if theta is not None:
        rotary["theta"] = theta
        positions = _flat_positions(kwargs["position_ids"], batch, seq, query.device)
        if packing.index is not None:
            positions = positions[packing.index]
    out = engine.v2pe_attention(
        q, k, v, packing.cu_seqlens, packing.max_seqlen, positions, causal=causal, softmax_scale=scaling, **rotary
    )
    if packing.index is not None:
        out = out.new_zeros(tokens, q_heads, dim).index_copy(0, packing.index, out)
    return out.view(batch, seq, q_heads, dim), None


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """transformers mask-function interface for the engine attention: it unpads from the 2-D padding mask itself,
    so that mask (its last kv_length columns) or None is all it needs."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]
