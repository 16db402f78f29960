"""Context parallelism: one pack's tokens split over the cp ranks of a group, the LLM's attention by Ulysses
(InternEvo's ISP) all-to-all, so that each rank holds 1/cp of the pack's activations.

Split: the pack (its tokens, V2PE positions, labels and loss weights computed whole first) is padded to a
multiple of cp with a padding sample of its own (no target, zero weight) and cut into cp contiguous chunks:
rank r keeps tokens [r * T/cp, (r + 1) * T/cp). Everything but attention is per token, so contiguous chunks
balance the work: attention, the only part that mixes tokens, runs on the whole pack for 1/cp of the heads.

Attention (``ulysses_attention``): q, k and v of the rank's tokens are exchanged by an all-to-all from
(tokens / cp, all heads) to (all tokens, heads / cp); the existing varlen kernel runs on the whole pack with
its cu_seqlens and positions, and a second all-to-all brings the output back to the rank's tokens. Each
rank sends and receives (cp - 1) / cp of its q, k, v and output. GQA: the query heads split evenly (cp
must divide them); key-value heads split too when cp divides them, and are repeated up to cp when they
divide cp (InternVL3-8B, 28 query and 4 key-value heads: cp 2 or 4; InternVL3-1B, 14 and 2: cp 2, or 14
with each key-value head 7 times).
The backward of each all-to-all is the opposite all-to-all, so gradients reach every rank's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.attention import v2pe_attention


def check_context_parallel_heads(cp: int, heads: int, kv_heads: int) -> None:
    """ValueError unless Ulysses attention over ``cp`` ranks can split these head counts."""
    if heads % cp:
        raise ValueError(f"context parallel degree {cp} must divide the query heads ({heads})")
    if kv_heads % cp and cp % kv_heads:
        raise ValueError(f"context parallel degree {cp} and the key-value heads ({kv_heads}) must divide one another")


def check_context_parallel_blocks(blocks, cp: int, tp: int = 1) -> None:
    """ValueError unless the LLM's decoder blocks (Qwen2 attention: self_attn.q_proj / k_proj and head_dim)
    hold head counts that Ulysses attention over ``cp`` ranks can split, after tensor parallelism's ``tp``."""
    attention = blocks[0].get_submodule("self_attn") if blocks is not None and len(blocks) else None
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ValueError("cp > 1 needs the language component's decoder blocks with Qwen2 attention (self_attn.head_dim)")
    heads = attention.q_proj.out_features // head_dim // tp
    kv_heads = attention.k_proj.out_features // head_dim // tp
    check_context_parallel_heads(cp, heads, kv_heads)


@dataclass(frozen=True)
class ContextShard:
    """This rank's share of a pack of ``total`` tokens padded to ``padded`` (a multiple of cp): tokens
    [start, stop) of the padded pack."""

    rank: int
    cp: int
    total: int
    padded: int

    @classmethod
    def of(cls, total: int, rank: int, cp: int) -> "ContextShard":
        if cp < 1 or not 0 <= rank < cp:
            raise ValueError(f"need 0 <= rank < cp, got rank {rank}, cp {cp}")
        if total < 1:
            raise ValueError(f"a pack needs at least one token, got {total}")
        return cls(rank, cp, total, -(-total // cp) * cp)

    @property
    def length(self) -> int:
        return self.padded // self.cp

    @property
    def start(self) -> int:
        return self.rank * self.length

    @property
    def stop(self) -> int:
        return self.start + self.length

    def padded_cu_seqlens(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The pack's cu_seqlens with the padding as one more sample (unchanged when there is none)."""
        if self.padded == self.total:
            return cu_seqlens
        return torch.cat([cu_seqlens, cu_seqlens.new_tensor([self.padded])])

    def pad(self, values: torch.Tensor, fill) -> torch.Tensor:
        """``values`` [total, ...] followed by ``fill`` up to the padded length (positions: 0, labels: the
        ignore index, loss weights: 0)."""
        if self.padded == self.total:
            return values
        return torch.cat([values, values.new_full((self.padded - self.total, *values.shape[1:]), fill)])

    def local(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """This rank's chunk of ``values`` [total, ...] (padded first)."""
        return self.pad(values, fill)[self.start:self.stop]


def _all_to_all(chunks: torch.Tensor, group) -> torch.Tensor:
    """[cp, ...] -> [cp, ...]: chunk j goes to rank j; chunk i of the result came from rank i."""
    chunks = chunks.contiguous()
    received = torch.empty_like(chunks)
    dist.all_to_all_single(received, chunks, group=group)
    return received


class _Exchange(torch.autograd.Function):
    """Tokens to heads ([T/cp, H, D] this rank's tokens, all heads -> [T, H/cp, D] all tokens, this rank's
    heads) or back; the backward of each direction is the other."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return (_sequence_to_heads if to_heads else _heads_to_sequence)(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (_heads_to_sequence if ctx.to_heads else _sequence_to_heads)(grad, ctx.group), None, None


def _sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    cp = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    chunks = x.reshape(tokens, cp, heads // cp, dim).transpose(0, 1)  # chunk j: head group j
    return _all_to_all(chunks, group).reshape(cp * tokens, heads // cp, dim)  # rank i's tokens, in rank order


def _heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    cp = dist.get_world_size(group)
    tokens, heads, dim = x.shape
    chunks = x.reshape(cp, tokens // cp, heads, dim)  # chunk i: rank i's tokens
    received = _all_to_all(chunks, group)  # chunk j: head group j of this rank's tokens
    return received.transpose(0, 1).reshape(tokens // cp, cp * heads, dim)


class _GatherChunks(torch.autograd.Function):
    """Each rank's [n, ...] -> [cp * n, ...] in rank order; the backward gives each rank the gradient of its
    chunk summed over the ranks (a reduce-scatter; gloo has none: all-reduce, then the chunk)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "gloo":
            dist.all_reduce(grad, group=group)
            return grad.chunk(cp)[rank].clone(), None
        mine = torch.empty_like(grad.chunk(cp)[rank])
        dist.reduce_scatter_tensor(mine, grad, group=group)
        return mine, None


def gather_chunks(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' equal chunks [n, ...] concatenated in rank order [cp * n, ...], differentiable (each rank's
    chunk receives the gradients all ranks' uses of it produce)."""
    return _GatherChunks.apply(x, group)


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    positions: torch.Tensor | None, group, **kwargs,
) -> torch.Tensor:
    """v2pe_attention over a pack split by ContextShard over the ranks of ``group``: q [T/cp, Hq, D] and
    k, v [T/cp, Hkv, D] are this rank's tokens; ``cu_seqlens``, ``max_seqlen`` and ``positions`` are the
    whole (padded) pack's. Returns this rank's tokens' output [T/cp, Hq, D]. ``kwargs`` go to
    v2pe_attention (theta, causal, softmax_scale)."""
    cp = dist.get_world_size(group)
    check_context_parallel_heads(cp, q.shape[1], k.shape[1])
    if positions is not None and positions.shape[0] != q.shape[0] * cp:
        raise ValueError(f"positions must be the whole pack's {q.shape[0] * cp} tokens, got {positions.shape[0]}")
    if k.shape[1] < cp:  # each rank needs one key-value head: repeat them up to cp
        k = k.repeat_interleave(cp // k.shape[1], dim=1)
        v = v.repeat_interleave(cp // v.shape[1], dim=1)
    whole = [_Exchange.apply(x, group, True) for x in (q, k, v)]
    out = v2pe_attention(*whole, cu_seqlens, max_seqlen, positions, **kwargs)
    return _Exchange.apply(out, group, False)


@dataclass(frozen=True)
class ContextParallel:
    """One pack's split over the ranks of ``group`` for a forward: this rank's ContextShard and the whole
    (padded) pack's attention metadata, which ``attention`` gives to ulysses_attention. Made by ``split``
    from the whole pack's cu_seqlens, max_seqlen and positions."""

    group: object
    shard: ContextShard
    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor | None

    @classmethod
    def split(cls, group, cu_seqlens: torch.Tensor, max_seqlen: int, positions: torch.Tensor | None = None) -> "ContextParallel":
        total = int(cu_seqlens[-1])
        shard = ContextShard.of(total, dist.get_rank(group), dist.get_world_size(group))
        positions = shard.pad(positions, 0.0) if positions is not None else None
        return cls(group, shard, shard.padded_cu_seqlens(cu_seqlens), max(max_seqlen, shard.padded - total), positions)

    def local(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """This rank's tokens of a per-token tensor of the whole pack (the padding filled with ``fill``)."""
        return self.shard.local(values, fill)

    def encode_split(self, encode, items: torch.Tensor, fill=0) -> torch.Tensor:
        """``encode`` (e.g. the vision tower and projector) of ``items`` [n, ...] (e.g. a pack's tiles), each rank
        encoding a contiguous share (padded with ``fill`` items to a multiple of cp) and the results gathered:
        the rows of all n items, as ``encode(items)`` would give, at 1/cp of the work per rank."""
        group = self.group
        share = ContextShard.of(items.shape[0], dist.get_rank(group), dist.get_world_size(group))
        rows = gather_chunks(encode(share.local(items, fill)), group)
        return rows[: rows.shape[0] // share.padded * share.total]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """v2pe_attention of this rank's q, k, v [T/cp, heads, D] over the whole pack (ulysses_attention)."""
        return ulysses_attention(q, k, v, self.cu_seqlens, self.max_seqlen, self.positions, self.group, **kwargs)
