"""Vision-aware load balancing of packed micro-batches across data-parallel ranks.

A micro-batch costs what its ViT and its LLM compute: the ViT work grows with its tiles, the LLM's with
its tokens (the linear layers) and with sum(L_i^2) over its samples (attention). Packing equalises
tokens, not this cost: two 16k-token packs can differ several-fold in tiles. The balancer gives every
rank the same number of micro-batches (FSDP runs its collectives once per forward and backward, so every
rank must run the same count) and minimises the largest rank's total cost.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class CostModel:
    """Training FLOPs (forward + backward) of one micro-batch.

    vit_flops_per_tile: a tile through the ViT (its linear layers and its attention over the tile).
    llm_flops_per_token: 6 x the LLM's non-embedding parameters (forward 2, backward 4 FLOPs per weight).
    llm_attention_flops_per_square_token: attention's share per unit of sum(L_i^2); for causal attention
    over a sample of L tokens, forward 2 * 2 * layers * hidden * L^2 / 2 and backward 2.5x that.
    """

    vit_flops_per_tile: float
    llm_flops_per_token: float
    llm_attention_flops_per_square_token: float

    def micro_batch(self, tiles: int, sample_lengths: Sequence[int]) -> float:
        tokens = sum(sample_lengths)
        squares = sum(length * length for length in sample_lengths)
        return (
            tiles * self.vit_flops_per_tile
            + tokens * self.llm_flops_per_token
            + squares * self.llm_attention_flops_per_square_token
        )

    @classmethod
    def from_shapes(
        cls,
        *,
        vit_params: int,
        vit_tokens_per_tile: int,
        vit_layers: int,
        vit_hidden: int,
        projector_params: int,
        llm_params: int,
        llm_layers: int,
        llm_hidden: int,
        llm_tokens_per_tile: int,
    ) -> "CostModel":
        """From component sizes (non-embedding parameter counts). The projector's work is per tile too."""
        vit_linear = 6 * vit_params * vit_tokens_per_tile
        # Bidirectional attention over a tile: QK^T and PV, 2 * 2 * n^2 * hidden per layer forward, x3.
        vit_attention = 3 * 4 * vit_layers * vit_hidden * vit_tokens_per_tile**2
        projector = 6 * projector_params * llm_tokens_per_tile
        causal_attention = 3.5 * 2 * llm_layers * llm_hidden  # forward 2*L^2*hidden/layer (causal half), bwd 2.5x
        return cls(
            vit_flops_per_tile=vit_linear + vit_attention + projector,
            llm_flops_per_token=6 * llm_params,
            llm_attention_flops_per_square_token=causal_attention,
        )


@dataclass(frozen=True)
class Assignment:
    """ranks[r]: indices of the micro-batches rank r runs, in order; loads[r] their total cost."""

    ranks: list[list[int]]
    loads: list[float]

    @property
    def imbalance(self) -> float:
        """max / mean of the rank loads (1.0 is perfect)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0


def _check(costs: Sequence[float], world_size: int) -> list[float]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    values = [float(c) for c in costs]
    if len(values) % world_size:
        raise ValueError(
            f"costs must hold a multiple of world_size = {world_size} micro-batches (every rank runs the same "
            f"number), got {len(values)}"
        )
    if any(not c >= 0 for c in values):  # NaN fails too
        raise ValueError("costs must be finite and non-negative")
    return values


def naive_split(costs: Sequence[float], world_size: int) -> Assignment:
    """Rank r takes the r-th contiguous slice: what a sampler without cost information does."""
    values = _check(costs, world_size)
    per_rank = len(values) // world_size
    ranks = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world_size)]
    return Assignment(ranks, [sum(values[i] for i in rank) for rank in ranks])


def balance(costs: Sequence[float], world_size: int, *, refine_rounds: int = 64) -> Assignment:
    """Assign micro-batches to ranks, the same count each, minimising the largest rank cost.

    Longest-processing-time first under the count constraint (the most expensive remaining micro-batch
    goes to the least-loaded rank with room), then pairwise swaps between the most loaded rank and the
    others while a swap lowers the maximum. Deterministic: every rank computes the same assignment from
    the same costs.
    """
    values = _check(costs, world_size)
    per_rank = len(values) // world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    heap = [(0.0, r) for r in range(world_size)]
    for index in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        load, r = heapq.heappop(heap)
        ranks[r].append(index)
        loads[r] = load + values[index]
        if len(ranks[r]) < per_rank:
            heapq.heappush(heap, (loads[r], r))
    for _ in range(refine_rounds):
        if not _improve_once(values, ranks, loads):
            break
    for rank in ranks:
        rank.sort()
    return Assignment(ranks, loads)


def _improve_once(values: list[float], ranks: list[list[int]], loads: list[float]) -> bool:
    """The swap between the most loaded rank and another that lowers the larger of the two loads most."""
    top = max(range(len(loads)), key=loads.__getitem__)
    best = None  # (new peak of the pair, other rank, position in top, position in other)
    for other in range(len(loads)):
        if other == top:
            continue
        for i, a in enumerate(ranks[top]):
            for j, b in enumerate(ranks[other]):
                moved = values[a] - values[b]
                if moved <= 0:
                    continue
                peak = max(loads[top] - moved, loads[other] + moved)
                if peak < loads[top] - 1e-12 * loads[top] and (best is None or peak < best[0]):
                    best = (peak, other, i, j)
    if best is None:
        return False
    _, other, i, j = best
    a, b = ranks[top][i], ranks[other][j]
    ranks[top][i], ranks[other][j] = b, a
    moved = values[a] - values[b]
    loads[top] -= moved
    loads[other] += moved
    return True
