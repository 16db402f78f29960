"""Drop-in engine kernels for transformers' InternVL and Qwen2 models, patched in place (in the manner of
Liger-Kernel's ``apply_liger_kernel_to_*`` functions)::

    from internvl3_engine.integrations.transformers import apply_internvl3_engine_to_internvl
    model = InternVLForConditionalGeneration.from_pretrained(...)
    apply_internvl3_engine_to_internvl(model)   # then train or run it as before

What changes (each part can be turned off):

- ``attention``: the language model's and the vision tower's attention run through ``v2pe_attention`` on packed
  (unpadded) tokens. The model's attention implementation becomes ``"internvl3_engine"``, registered with
  transformers' AttentionInterface, with a mask function that hands the attention the 2-D padding mask instead
  of a 4-D one. Sequence boundaries come from, in order: a ``cu_seqlens`` keyword argument of the forward
  (int32 [B+1] over the B*S tokens of the batch; FlashAttention's ``cu_seq_lens_q`` also works), the 2-D
  ``attention_mask`` (each row's unmasked tokens are one sequence), or ``position_ids``: a position not greater
  than the one before it starts a new sequence (packed rows, whose positions restart at 0 for every sample;
  V2PE positions grow strictly within a sample). Without any of these every row is one sequence. The vision
  tower's tiles are one non-causal sequence each. Decoding with a KV cache (queries fewer than keys) runs a
  plain PyTorch attention over the cache instead; a 4-D attention mask, attention dropout or a sliding window
  raise.
- ``rotary``: Qwen2's rotary embedding is computed by the engine from float32 ``position_ids`` (V2PE positions
  may be fractional: they are never truncated), inside ``v2pe_attention`` when it runs, else with
  ``apply_rotary``; keys enter a KV cache rotated, as in transformers. Needs ``rope_type`` "default".
- ``pixel_unshuffle_layernorm``: InternVL's pixel shuffle and the projector's LayerNorm run fused in
  ``pixel_unshuffle_layernorm``: ``InternVLModel.pixel_shuffle`` passes the vision features through and the
  projector, seeing unshuffled features (their width is the vision width), applies the fused op to them
  (features shuffled elsewhere still take the plain LayerNorm).
- ``cross_entropy``: given ``labels``, the causal-LM loss is ``linear_cross_entropy`` of the final hidden states
  and the head's weight (the [B, S, V] logits are never built for it), with transformers' conventions: labels
  shifted by one within each row (or ``shift_labels`` given), ``ignore_index`` -100, the mean over supervised
  tokens or the sum divided by ``num_items_in_batch``. ``loss_weights`` makes it InternVL3's weighted loss
  sum(w * CE) / sum(w): a mode of ``loss_weights`` ("square", InternVL3's square averaging; "sample";
  "token") over the samples (rows, or the packed samples found as for the attention), or a float tensor of
  the labels' shape given at the labels' positions. In training mode the output's ``logits`` are then None
  (as Liger's fused loss does); in eval mode they are computed as well. The patched forward keeps the
  class's signature and output class: arguments other than the head's pass to the inner model unchanged, and
  the output takes the inner model's fields by name.

Tested with transformers 5.20 (the oldest release the ``transformers`` extra allows) to 5.25; the KV cache
argument is ``cache`` from 5.24 and ``past_key_values`` before, both accepted.

transformers is an optional dependency (the ``transformers`` extra): it is imported by these functions only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import internvl3_engine as engine

__all__ = ["ATTENTION_IMPLEMENTATION", "apply_internvl3_engine_to_internvl", "apply_internvl3_engine_to_qwen2"]

ATTENTION_IMPLEMENTATION = "internvl3_engine"
# The keyword argument through which a decoder hands its layers the packing it computed once per forward.
_PACKING = "internvl3_engine_packing"
# The keyword argument through which a patched Qwen2 attention asks the attention function for rotary.
_ROTARY_THETA = "internvl3_engine_rotary_theta"
# transformers' names for the KV cache argument: "cache" from 5.24, "past_key_values" before (still accepted).
_CACHE_NAMES = ("cache", "past_key_values")


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "internvl3_engine.integrations.transformers patches transformers models, but transformers is not "
            "installed: pip install 'internvl3-engine[transformers]' (or pip install transformers)"
        ) from error
    return transformers


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


def _register_attention() -> None:
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, engine_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, _padding_mask)


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


# ---- projector


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


# ---- loss


_LOSS_KEYWORDS = ("num_items_in_batch", "shift_labels", "ignore_index", "loss_weights")


def _shifted(x: torch.Tensor, fill) -> torch.Tensor:
    """x [B, S] moved one step left within each row (position t takes t + 1's value; the last takes ``fill``):
    the causal LM's targets from labels given at their tokens."""
    return F.pad(x, (0, 1), value=fill)[..., 1:]


def _token_weights(loss_weights, targets: torch.Tensor, ignore_index: int, boundaries) -> torch.Tensor:
    """float32 [B*S] weights of the shifted targets [B, S]: a mode of ``engine.loss_weights`` ("token", "sample",
    "square") over the samples that ``boundaries()`` (int32 cu_seqlens over the B*S tokens) delimits, or a
    tensor of the labels' shape, given at the labels' (unshifted) positions and shifted with them."""
    if isinstance(loss_weights, str):
        return engine.loss_weights(targets.reshape(-1), boundaries(), loss_weights, ignore_index)
    if not isinstance(loss_weights, torch.Tensor):
        raise TypeError(f"loss_weights must be a mode name or a tensor, got {type(loss_weights).__name__}")
    return loss_weights.to(device=targets.device, dtype=torch.float32).reshape(-1)


def _fused_loss(self, hidden: torch.Tensor, named: dict, loss_keys: dict) -> Optional[torch.Tensor]:
    """The causal-LM loss of the final hidden states [B, S, H] through linear_cross_entropy, or None without
    labels. Token mean over the supervised targets (or the sum over ``num_items_in_batch``), as transformers'
    loss; with ``loss_weights`` sum(w * CE) / sum(w)."""
    labels, shift_labels = named.get("labels"), loss_keys.get("shift_labels")
    if labels is None and shift_labels is None:
        return None
    ignore_index = loss_keys.get("ignore_index", -100)
    targets = _shifted(labels, ignore_index) if shift_labels is None else shift_labels
    targets = targets.to(hidden.device)
    weights, normalizer = loss_keys.get("loss_weights"), loss_keys.get("num_items_in_batch")
    if weights is not None:
        if normalizer is not None:
            raise ValueError(
                "num_items_in_batch counts tokens, but a loss with loss_weights is normalised by the sum of its "
                "weights: leave num_items_in_batch out (with transformers' Trainer, set model.accepts_loss_kwargs "
                "= False)"
            )
        if isinstance(weights, torch.Tensor):
            if weights.shape != targets.shape:
                raise ValueError(f"loss_weights must have the labels' shape {tuple(targets.shape)}, got {tuple(weights.shape)}")
            if shift_labels is None:
                weights = _shifted(weights, 0.0)
        batch, seq = targets.shape[:2]
        weights = _token_weights(
            weights, targets, ignore_index,
            lambda: _packing(batch, seq, hidden.device, None, named.get("position_ids"), _cu_seqlens_kwarg(named),
                             _max_seqlen_kwarg(named)).cu_seqlens,
        )
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=hidden.device, dtype=torch.float32).reshape(())
    elif normalizer is not None:
        normalizer = float(normalizer)
    head = self.get_output_embeddings()
    return engine.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), bias=head.bias,
        loss_weights=weights, ignore_index=ignore_index, normalizer=normalizer,
    )


def _kept_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states [B, S, H] whose logits are wanted, as transformers' causal LMs select them: an int
    keeps the last ``logits_to_keep`` positions (0 keeps all), a 1-D tensor those positions of every row, a
    2-D integer tensor per-row positions, a 2-D bool mask its True positions (flattened)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


def _causal_lm_forward(self, named: dict, output_class):
    """The forward of a causal LM (InternVLForConditionalGeneration, Qwen2ForCausalLM) with the loss through
    linear_cross_entropy, from its arguments by name: everything but the head's (labels, logits_to_keep, the
    loss keywords) goes to the inner model unchanged, and the output is ``output_class`` filled from the inner
    model's output fields of the same names, so that arguments and fields renamed by a transformers release
    pass through."""
    return_dict = named.pop("return_dict", None)
    logits_to_keep = named.pop("logits_to_keep", 0)
    loss_keys = {key: named.pop(key) for key in _LOSS_KEYWORDS if key in named}
    labels = named.pop("labels", None)
    outputs = self.model(**named, return_dict=True)
    hidden = outputs.last_hidden_state
    loss = _fused_loss(self, hidden, {**named, "labels": labels}, loss_keys)
    logits = None
    if loss is None or not self.training:
        logits = self.get_output_embeddings()(_kept_positions(hidden, logits_to_keep))
    carried = {f.name for f in dataclasses.fields(output_class)} & {f.name for f in dataclasses.fields(outputs)}
    result = output_class(loss=loss, logits=logits, **{name: getattr(outputs, name) for name in carried - {"loss", "logits"}})
    return result.to_tuple() if return_dict is False else result


# ---- patching


def _patch_method(module, name: str, function) -> None:
    setattr(module, name, types.MethodType(function, module))


def _patch_causal_lm_forward(model, output_class) -> None:
    """Replace a causal LM's forward with _causal_lm_forward, taking the class's own forward signature
    (positional arguments bind by it, and generate() checks its keyword arguments against it)."""
    signature = inspect.signature(type(model).forward)
    var_keyword = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    def forward(self, *args, **kwargs):
        named = signature.bind_partial(self, *args, **kwargs).arguments
        del named[next(iter(signature.parameters))]  # self
        if var_keyword:
            named.update(named.pop(var_keyword[0], {}))
        return _causal_lm_forward(self, named, output_class)

    forward.__signature__ = signature
    _patch_method(model, "forward", forward)


def _patch_qwen2_decoders(model, attention: bool, rotary: bool) -> None:
    from transformers.models.qwen2 import modeling_qwen2

    decoders = [m for m in model.modules() if isinstance(m, modeling_qwen2.Qwen2Model)]
    if not decoders:
        raise TypeError(f"found no transformers Qwen2Model in {type(model).__name__}")
    for decoder in decoders:
        config = decoder.config
        if attention:
            if getattr(config, "attention_dropout", 0.0):
                raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no dropout, but attention_dropout is {config.attention_dropout}")
            if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
                raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no sliding window; the config uses one")
            decoder.set_attn_implementation(ATTENTION_IMPLEMENTATION)
            if not getattr(decoder, "internvl3_engine_packing_hook", None):
                decoder.internvl3_engine_packing_hook = decoder.register_forward_pre_hook(_pack_before_decoder, with_kwargs=True)
        if rotary:
            rope = getattr(config, "rope_parameters", None) or {}
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"the engine's rotary is Qwen2's default rotary; this config's rope_type is {rope_type!r}")
            theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
            for layer in decoder.layers:
                layer.self_attn.internvl3_engine_rope_theta = theta
                _patch_method(layer.self_attn, "forward", _qwen2_attention_forward)


def apply_internvl3_engine_to_qwen2(model, *, attention: bool = True, rotary: bool = True, cross_entropy: bool = True):
    """Patch a transformers Qwen2 model (Qwen2ForCausalLM, Qwen2Model, or any module holding a Qwen2Model) in place
    to run on the engine: ``attention`` packed varlen v2pe_attention, ``rotary`` the engine's rotary at float
    position_ids, ``cross_entropy`` the fused linear cross-entropy loss (Qwen2ForCausalLM). Returns the model.
    Patching again is harmless. See the module docstring for the details."""
    _require_transformers()
    from transformers.models.qwen2 import modeling_qwen2

    if attention:
        _register_attention()
    _patch_qwen2_decoders(model, attention, rotary)
    if cross_entropy and isinstance(model, modeling_qwen2.Qwen2ForCausalLM):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        _patch_causal_lm_forward(model, CausalLMOutputWithPast)
    return model


def apply_internvl3_engine_to_internvl(
    model, *, attention: bool = True, rotary: bool = True, pixel_unshuffle_layernorm: bool = True, cross_entropy: bool = True
):
    """Patch a transformers InternVL model (InternVLForConditionalGeneration or InternVLModel, with a Qwen2
    language model) in place to run on the engine: ``attention`` packed varlen v2pe_attention in the language
    model (causal) and the vision tower (non-causal, no positions), ``rotary`` the engine's rotary at float V2PE
    position_ids, ``pixel_unshuffle_layernorm`` the projector's fused pixel shuffle + LayerNorm,
    ``cross_entropy`` the fused linear cross-entropy loss. Returns the model. Patching again is harmless. See the
    module docstring for the details."""
    _require_transformers()
    from transformers.models.internvl import modeling_internvl as internvl

    base = model.model if isinstance(model, internvl.InternVLForConditionalGeneration) else model
    if not isinstance(base, internvl.InternVLModel):
        raise TypeError(f"expected a transformers InternVLForConditionalGeneration or InternVLModel, got {type(model).__name__}")
    if attention:
        _register_attention()
        vision = base.vision_tower
        if getattr(vision.config, "attention_dropout", 0.0):
            raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no dropout, but the vision attention_dropout is {vision.config.attention_dropout}")
        vision.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    _patch_qwen2_decoders(base.language_model, attention, rotary)
    if pixel_unshuffle_layernorm:
        projector = base.multi_modal_projector
        if projector.layer_norm.weight is None or projector.layer_norm.bias is None:
            raise ValueError("pixel_unshuffle_layernorm needs the projector's LayerNorm weight and bias")
        projector.internvl3_engine_downsample_ratio = float(base.config.downsample_ratio)
        _patch_method(projector, "forward", _projector_forward)
        _patch_method(base, "pixel_shuffle", _unshuffled)
    if cross_entropy and isinstance(model, internvl.InternVLForConditionalGeneration):
        _patch_causal_lm_forward(model, internvl.InternVLCausalLMOutputWithPast)
    return model
