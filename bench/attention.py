"""v2pe_attention's cases and baselines: the LLM's causal packs (with and without V2PE positions) and the
ViT's tiles, on the engine's backends and rotary modes, against torch SDPA (each backend), FlexAttention
and FlashAttention.

Every implementation gets the same arguments (q [T,Hq,D], k and v [T,Hk,D], cu_seqlens, max_seqlen,
positions or None) and computes the same function. The baselines apply the rotary as a separate pass
(internvl3_engine.apply_rotary on q and k, the engine's fastest rotary kernel) when there are positions,
and that pass is inside their timing: it is the work the engine's kernels fuse.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import internvl3_engine

from .harness import Case, Implementation, OpSpec, engine, randn

ROTARY_MODES = ("prerotate_k", "separate")
V2PE_DELTA = 1 / 16  # V2PE's position step for a visual token (a text token steps by 1)
VISUAL_FRACTION = 0.5  # of the tokens, for the positions only (the kernels' speed does not depend on them)
# The reference materialises every segment's float32 scores [Hq, L, L] (and more in its backward): it is
# timed only where the longest segment's take at most this much.
REFERENCE_SCORE_BYTES = 256 * 2**20
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


@dataclass(frozen=True)
class Segments:
    """A pack of ``tokens`` tokens cut into segments of random lengths from ``shortest`` to ``longest``
    (uniform), the last one taking what is left (it may be shorter); shortest == longest gives equal
    segments, e.g. the ViT's tiles."""

    tokens: int
    shortest: int
    longest: int

    def lengths(self, generator: torch.Generator) -> list[int]:
        lengths, left = [], self.tokens
        while left > 0:
            draw = int(torch.randint(self.shortest, self.longest + 1, (1,), generator=generator))
            lengths.append(min(draw, left))
            left -= lengths[-1]
        return lengths

    def __str__(self) -> str:
        if self.shortest == self.longest:
            return f"{self.tokens // self.longest}x{self.longest}"
        return f"{self.tokens} in {self.shortest}..{self.longest}"


def _v2pe_positions(cu_seqlens: torch.Tensor, device, generator) -> torch.Tensor:
    """float32 [T] V2PE positions: per segment from 0, stepping 1 per text token and V2PE_DELTA per visual
    token (a random VISUAL_FRACTION of the tokens)."""
    tokens = int(cu_seqlens[-1])
    visual = torch.rand(tokens, device=device, generator=generator) < VISUAL_FRACTION
    steps = torch.where(visual, V2PE_DELTA, 1.0)
    before = torch.cumsum(steps, 0) - steps  # the sum of the steps before each token in the pack
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return before - torch.repeat_interleave(before[starts], lengths)


def make_attention(device, dtype, generator, segments: Segments, heads: int, kv_heads: int, head_dim: int,
                   positions: bool):
    """(q, k, v, cu_seqlens, max_seqlen, positions or None): random q, k, v over a pack of ``segments``."""
    # The lengths are drawn on the host from a seed taken from the (possibly CUDA) generator.
    seed = int(torch.randint(2**31, (1,), device=device, generator=generator))
    lengths = segments.lengths(torch.Generator().manual_seed(seed))
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    q = randn((segments.tokens, heads, head_dim), dtype, device, generator)
    k = randn((segments.tokens, kv_heads, head_dim), dtype, device, generator)
    v = randn((segments.tokens, kv_heads, head_dim), dtype, device, generator)
    return q, k, v, cu_seqlens, max(lengths), _v2pe_positions(cu_seqlens, device, generator) if positions else None


def attention_flops(args, causal: bool = True, **options):
    """FlashAttention's count: forward 4 * sum(L_i^2) * Hq * D (QK^T and PV), halved when causal; backward
    2.5x the forward."""
    q, _, _, cu_seqlens, _, _ = args
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    forward = 4 * float((lengths**2).sum()) * q.shape[1] * q.shape[2] / (2 if causal else 1)
    return forward, 2.5 * forward


# ---- availability ---------------------------------------------------------------------------------------

def import_error(module: str, name: str) -> str | None:
    """None when ``module`` imports and has ``name``; else why not (for a skip reason)."""
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        return f"{module}.{name} is not importable here ({type(error).__name__}: {error})"
    return None


def _reference_unavailable(case: Case, device: torch.device, dtype: torch.dtype) -> str | None:
    segments, heads = case.params["segments"], case.params["heads"]
    scores = 4 * heads * segments.longest**2
    if scores > REFERENCE_SCORE_BYTES:
        return (f"the reference materialises O(L^2) float32 scores per segment ({scores / 2**30:.2f} GiB for the "
                f"longest); timed only up to {REFERENCE_SCORE_BYTES / 2**20:.0f} MiB")
    return None


def _gpu_only(what: str, module: str, name: str, half_only: bool = False):
    def reason(case: Case, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"{what} is timed on GPUs only"
        if half_only and dtype not in (torch.float16, torch.bfloat16):
            return f"{what} takes float16 and bfloat16 only"
        return import_error(module, name)

    return reason


# ---- baselines ------------------------------------------------------------------------------------------

def _rotated(q, k, positions, theta):
    if positions is None:
        return q, k
    return internvl3_engine.apply_rotary(q, positions, theta), internvl3_engine.apply_rotary(k, positions, theta)


def _equal_length_runs(args, options) -> list[tuple[int, int, int]]:
    """(start token, segments, length) of each run of consecutive equal-length segments, read on the host
    once per input set."""
    bounds = args[3].tolist()
    runs: list[tuple[int, int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][2] == end - start and runs[-1][0] + runs[-1][1] * runs[-1][2] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, end - start)
        elif end > start:
            runs.append((start, 1, end - start))
    return runs


def _sdpa(backend_name: str):
    """torch SDPA restricted to one backend, called once per run of equal-length segments as a batch (the
    ViT's 16 tiles are one call of batch 16; a pack of mixed lengths is one call per segment), K and V
    repeated to the query heads first (as transformers' sdpa attention does), causal inside a segment."""

    def call(runs, q, k, v, cu_seqlens, max_seqlen, positions, *, causal=True, theta=1e6):
        q, k = _rotated(q, k, positions, theta)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        heads, head_dim = q.shape[1], q.shape[2]
        outs = []
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            for start, count, length in runs:
                batch = [x[start:start + count * length].view(count, length, heads, head_dim).transpose(1, 2)
                         for x in (q, k, v)]
                out = F.scaled_dot_product_attention(*batch, is_causal=causal)
                outs.append(out.transpose(1, 2).reshape(count * length, heads, head_dim))
        return torch.cat(outs)

    return call


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_block_mask(args, options):
    """FlexAttention's block mask of the pack: a query sees the keys of its own segment (document mask),
    up to itself when causal. Built once per input set, outside the timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, cu_seqlens = args[0], args[3]
    tokens = q.shape[0]
    document = torch.searchsorted(cu_seqlens[1:], torch.arange(tokens, device=q.device, dtype=torch.int32), right=True)
    causal = options.get("causal", True)

    def mask(batch, head, q_index, kv_index):
        same = document[q_index] == document[kv_index]
        return same & (q_index >= kv_index) if causal else same

    return create_block_mask(mask, None, None, tokens, tokens, device=q.device)


def _flex(block_mask, q, k, v, cu_seqlens, max_seqlen, positions, *, causal=True, theta=1e6):
    q, k = _rotated(q, k, positions, theta)
    as_batch = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  [T, H, D] -> [1, H, T, D]
    out = _compiled_flex_attention()(as_batch(q), as_batch(k), as_batch(v), block_mask=block_mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def _flash_attn(_context, q, k, v, cu_seqlens, max_seqlen, positions, *, causal=True, theta=1e6):
    from flash_attn import flash_attn_varlen_func

    q, k = _rotated(q, k, positions, theta)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)


def attention_implementations(case: Case) -> list[Implementation]:
    """The engine's reference, its Triton kernels (one row per rotary mode when there are positions; the
    modes differ only in how they rotate), then the baselines."""
    name = case.spec.name
    with_positions = case.params["positions"]
    triton = ([engine(name, "triton", f"triton[{mode}]", rotary_mode=mode) for mode in ROTARY_MODES]
              if with_positions else [engine(name, "triton")])
    sdpa = [Implementation(f"sdpa-{backend.split('_')[0].lower()}", _sdpa(backend), prepare=_equal_length_runs)
            for backend in SDPA_BACKENDS]
    return [
        engine(name, "torch", unavailable=_reference_unavailable),
        *triton,
        *sdpa,
        Implementation("flex", _flex, prepare=_flex_block_mask,
                       unavailable=_gpu_only("FlexAttention", "torch.nn.attention.flex_attention", "flex_attention")),
        Implementation("flash-attn", _flash_attn,
                       unavailable=_gpu_only("FlashAttention", "flash_attn", "flash_attn_varlen_func", half_only=True)),
    ]


V2PE_ATTENTION = OpSpec("v2pe_attention", make_attention, differentiable=(0, 1, 2), flops=attention_flops,
                        implementations=attention_implementations)

# The LLM: a 16k-token pack of samples of 256 to 4096 tokens, Qwen2.5-7B's 28:4 and -0.5B's 14:2 heads of
# 128, causal, with V2PE positions (the rotary inside) and without. The ViT (InternViT-300M): 16 tiles of
# 1 + 32x32 tokens, 16 heads of 64, not causal, no rotary.
_LLM_REAL = Segments(16384, 256, 4096)
_VIT_REAL = Segments(16 * 1025, 1025, 1025)
_LLM_TINY = Segments(32, 5, 20)
_VIT_TINY = Segments(2 * 9, 9, 9)
CASES: dict[str, list[Case]] = {
    "real": [
        *(Case(V2PE_ATTENTION, dict(segments=_LLM_REAL, heads=heads, kv_heads=kv_heads, head_dim=128, positions=with_positions),
               dict(causal=True), name=f"LLM {model}")
          for model, heads, kv_heads in (("7B", 28, 4), ("0.5B", 14, 2)) for with_positions in (True, False)),
        Case(V2PE_ATTENTION, dict(segments=_VIT_REAL, heads=16, kv_heads=16, head_dim=64, positions=False),
             dict(causal=False), name="ViT"),
    ],
    "tiny": [
        *(Case(V2PE_ATTENTION, dict(segments=_LLM_TINY, heads=2, kv_heads=1, head_dim=16, positions=with_positions),
               dict(causal=True), name="LLM")
          for with_positions in (True, False)),
        Case(V2PE_ATTENTION, dict(segments=_VIT_TINY, heads=2, kv_heads=2, head_dim=16, positions=False),
             dict(causal=False), name="ViT"),
    ],
}
