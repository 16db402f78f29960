"""Generation for the reference InternVL3: greedy and sampled decoding with a KV cache at V2PE positions, stop
tokens, and Best-of-N (N sampled candidates scored by a caller-given function, the best kept: the InternVL3
report's test-time scaling).

The prompt runs once through the model's ordinary packed forward (V2PE positions with the given ``delta``); the
keys and values of every decoder layer are captured from its k/v projections during that forward and the keys
rotated at their float V2PE positions (``apply_rotary``), so the cache holds exactly what ``v2pe_attention``
attends to. Each new token then runs alone through the decoder (plain PyTorch attention of its query against the
cache, GQA), at the position V2PE gives a text token after the prompt, + 1 per generated token. Generated tokens
are text, whatever their id (an ``<IMG_CONTEXT>`` id generated has no image behind it). The N candidates of a
sampling run decode as one batch sharing the prompt's cache; finished candidates leave the batch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

import internvl3_engine as engine

ScoreFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class GenerationOutput:
    """``tokens`` int64 [n]: the new tokens of the returned sequence (the best-scored one with Best-of-N, else
    the first), a stop token included when one ended it. ``sequences``: every candidate's new tokens, in
    sampling order (one for greedy decoding). ``scores``: score_fn of each candidate (Best-of-N only, else
    None); ``best_index`` the candidate ``tokens`` is (the first of equal best scores)."""

    tokens: torch.Tensor
    sequences: list[torch.Tensor] = field(default_factory=list)
    scores: Optional[list[float]] = None
    best_index: int = 0


def _check_options(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, num_return_sequences, best_of_n, score_fn):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 1 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D prompt [T], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    if not (isinstance(temperature, numbers.Real) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and top_k > 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not (isinstance(num_return_sequences, numbers.Integral) and num_return_sequences > 0):
        raise ValueError(f"num_return_sequences must be a positive int, got {num_return_sequences!r}")
    if best_of_n is not None:
        if not (isinstance(best_of_n, numbers.Integral) and best_of_n > 0):
            raise ValueError(f"best_of_n must be a positive int or None, got {best_of_n!r}")
        if score_fn is None or not callable(score_fn):
            raise ValueError("best_of_n needs score_fn(prompt_ids, candidate_ids) -> float")
        if num_return_sequences != 1:
            raise ValueError("give either best_of_n or num_return_sequences, not both")
    if (best_of_n or num_return_sequences) > 1 and not do_sample:
        raise ValueError("several candidates need do_sample=True (greedy decoding gives one sequence)")


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Next tokens [n] from logits [n, V]: argmax, or a draw from softmax(logits / temperature) restricted to
    the top_k most likely tokens and then to the smallest set whose probability reaches top_p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the most likely one always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row against its cache: q [n, Hq, D], keys/values [n, L, Hk, D] -> [n, Hq, D]; query head
    h reads kv head h // (Hq / Hk) (GQA), softmax in float32."""
    n, q_heads, dim = q.shape
    kv_heads = keys.shape[2]
    grouped = q.view(n, kv_heads, q_heads // kv_heads, dim).float()
    weights = torch.einsum("nhgd,nlhd->nhgl", grouped, keys.float()) * scale
    out = torch.einsum("nhgl,nlhd->nhgd", weights.softmax(dim=-1), values.float())
    return out.reshape(n, q_heads, dim).to(q.dtype)


class _KVCache:
    """Per decoder layer, rotated keys and values [n, capacity, Hk, D]; ``length`` slots are filled."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


@torch.no_grad()
def _prefill(model, input_ids, pixel_values, image_flags, delta, rows: int, capacity: int):
    """The prompt through the model's packed forward: (last-token logits [V], the cache for ``rows`` candidates
    with room for ``capacity`` tokens, the V2PE position of the first generated token)."""
    language = model.language
    is_visual = input_ids == model.config.image_token_id
    length = input_ids.shape[0]
    # One text token past the prompt gives the position V2PE continues with (after an image: ceil + 1).
    extended = torch.cat([is_visual, is_visual.new_zeros(1)])
    positions = engine.v2pe_position_ids(extended, engine.cu_seqlens_from_lengths([length + 1], device=input_ids.device), delta)
    next_position = float(positions[-1])
    positions = positions[:length]

    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(language.layers):
        for name in ("k_proj", "v_proj"):
            def capture(module, args, output, key=(index, name)):
                captured[key] = output
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(capture))
    try:
        out = model(input_ids, pixel_values=pixel_values, positions=positions, image_flags=image_flags, return_logits=False)
    finally:
        for hook in hooks:
            hook.remove()
    logits = language.lm_head(out.hidden_states[-1])

    keys, values = [], []
    for index, layer in enumerate(language.layers):
        attn = layer.self_attn
        shape = (length, attn.num_kv_heads, attn.head_dim)
        k = engine.apply_rotary(captured[(index, "k_proj")].view(shape), positions, attn.theta)
        v = captured[(index, "v_proj")].view(shape)
        k_cache = k.new_empty(rows, capacity, *shape[1:])
        v_cache = v.new_empty(rows, capacity, *shape[1:])
        k_cache[:, :length] = k
        v_cache[:, :length] = v
        keys.append(k_cache)
        values.append(v_cache)
    return logits, _KVCache(keys, values, length), next_position


@torch.no_grad()
def _decode_step(model, tokens: torch.Tensor, position: float, cache: _KVCache) -> torch.Tensor:
    """tokens [n] (one per candidate, all at ``position``) through the decoder against the cache, which they
    join; returns the logits [n, V]. The layer structure is language.DecoderLayer's."""
    language = model.language
    x = language.embed_tokens(tokens)
    n = tokens.shape[0]
    positions = torch.full((n,), position, dtype=torch.float32, device=tokens.device)
    slot = cache.length
    for index, layer in enumerate(language.layers):
        attn = layer.self_attn
        h = layer.input_norm(x)
        q = engine.apply_rotary(attn.q_proj(h).view(n, attn.num_heads, attn.head_dim), positions, attn.theta)
        k = engine.apply_rotary(attn.k_proj(h).view(n, attn.num_kv_heads, attn.head_dim), positions, attn.theta)
        cache.keys[index][:, slot] = k
        cache.values[index][:, slot] = attn.v_proj(h).view(n, attn.num_kv_heads, attn.head_dim)
        out = _cached_attention(q, cache.keys[index][:, : slot + 1], cache.values[index][:, : slot + 1], attn.head_dim**-0.5)
        x = x + attn.o_proj(out.reshape(n, attn.num_heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_norm(x))
    cache.length = slot + 1
    return language.lm_head(language.norm(x))


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_token_ids: Sequence[int] = (),
    delta: Union[float, Sequence[float]] = 1.0,
    num_return_sequences: int = 1,
    best_of_n: Optional[int] = None,
    score_fn: Optional[ScoreFn] = None,
    generator: Optional[torch.Generator] = None,
    image_flags: Optional[torch.Tensor] = None,
) -> GenerationOutput:
    """Continue one prompt with ``model`` (a ``model.InternVL3``).

    input_ids int64 [T] the prompt, pixel_values [N_tiles, 3, H, W] the tiles of its ``<IMG_CONTEXT>`` tokens
    (as for ``forward``); ``delta`` the V2PE position step of the prompt's image tokens (0 < delta <= 1), or
    one per image in order (several images, or a video's frames, each with its own step).
    Decoding stops at ``max_new_tokens`` or after a token of ``stop_token_ids`` (kept in the output).

    Greedy (``do_sample=False``) or sampled from softmax(logits / ``temperature``) restricted to ``top_k``
    tokens and nucleus ``top_p``, drawing from ``generator`` (a seeded torch.Generator on the model's device
    makes sampling reproducible). ``num_return_sequences`` candidates are sampled independently; with
    ``best_of_n`` N candidates are sampled and scored by ``score_fn(prompt_ids, candidate_ids) -> float`` and
    the best is returned (all of them, with their scores, in the output). ``image_flags`` as for ``forward``.
    """
    _check_options(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, num_return_sequences, best_of_n, score_fn)
    input_ids = input_ids.long()
    if not isinstance(delta, numbers.Real):
        delta = torch.as_tensor(delta, dtype=torch.float32, device=input_ids.device)
    stops = {int(t) for t in stop_token_ids}
    candidates = best_of_n or num_return_sequences
    outputs: list[list[int]] = [[] for _ in range(candidates)]
    if max_new_tokens > 0:
        logits, cache, position = _prefill(
            model, input_ids, pixel_values, image_flags, delta, candidates, input_ids.shape[0] + max_new_tokens
        )
        logits = logits.expand(candidates, -1)
        active = torch.arange(candidates, device=input_ids.device)
        for step in range(max_new_tokens):
            tokens = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            listed = tokens.tolist()
            for row, token in zip(active.tolist(), listed):
                outputs[row].append(token)
            if step == max_new_tokens - 1:
                break
            going = torch.tensor([token not in stops for token in listed], device=tokens.device)
            if not bool(going.any()):
                break
            if not bool(going.all()):
                rows = torch.nonzero(going).squeeze(1)
                active, tokens = active[rows], tokens[rows]
                cache.keep(rows)
            logits = _decode_step(model, tokens, position + step, cache)

    sequences = [torch.tensor(tokens, dtype=torch.int64, device=input_ids.device) for tokens in outputs]
    if best_of_n is None:
        return GenerationOutput(tokens=sequences[0], sequences=sequences)
    scores = [float(score_fn(input_ids, candidate)) for candidate in sequences]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return GenerationOutput(tokens=sequences[best], sequences=sequences, scores=scores, best_index=best)
