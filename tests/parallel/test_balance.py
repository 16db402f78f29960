import random

import pytest

from internvl3_engine.parallel import CostModel, balance, naive_split

# InternVL3-8B: InternViT-300M (~0.3B, 1025 tokens a 448 tile, 24 layers of 1024), projector, Qwen2.5-7B
# (~6.5B non-embedding parameters, 28 layers of 3584); 256 LLM tokens a tile.
COSTS = CostModel.from_shapes(
    vit_params=300_000_000, vit_tokens_per_tile=1025, vit_layers=24, vit_hidden=1024,
    projector_params=4096 * 3584 + 3584 * 3584, llm_params=6_500_000_000, llm_layers=28, llm_hidden=3584,
    llm_tokens_per_tile=256,
)


def _internvl_packs(rng: random.Random, count: int, budget: int = 16384):
    """Micro-batches packed greedily up to `budget` tokens from InternVL-like samples: 1-12 tiles plus a
    thumbnail when more than one, 256 tokens a tile, text 20-2000 tokens; a quarter of samples text-only."""
    packs, tiles, lengths = [], 0, []
    while len(packs) < count:
        if rng.random() < 0.25:
            sample_tiles = 0
        else:
            sample_tiles = rng.randint(1, 12)
            sample_tiles += sample_tiles > 1
        length = rng.randint(20, 2000) + 256 * sample_tiles
        if lengths and sum(lengths) + length > budget:
            packs.append(COSTS.micro_batch(tiles, lengths))
            tiles, lengths = 0, []
        tiles += sample_tiles
        lengths.append(length)
    return packs


@pytest.mark.parametrize("world_size,per_rank", [(2, 4), (8, 8), (64, 4)])
def test_balanced_imbalance_at_most_1_05(world_size, per_rank):
    rng = random.Random(world_size * 1000 + per_rank)
    costs = _internvl_packs(rng, world_size * per_rank)
    naive = naive_split(costs, world_size)
    balanced = balance(costs, world_size)
    print(f"world {world_size} x {per_rank}: naive imbalance {naive.imbalance:.3f}, balanced {balanced.imbalance:.3f}")
    assert balanced.imbalance <= 1.05
    assert balanced.imbalance <= naive.imbalance


def test_every_micro_batch_once_and_equal_counts():
    costs = [random.uniform(0, 10) for _ in range(24)]
    result = balance(costs, 6)
    assert sorted(i for rank in result.ranks for i in rank) == list(range(24))
    assert all(len(rank) == 4 for rank in result.ranks)
    for rank, load in zip(result.ranks, result.loads):
        assert load == pytest.approx(sum(costs[i] for i in rank))


def test_optimal_on_a_small_case():
    # {8, 7, 6, 5, 4, 3, 2, 1} on 2 ranks of 4: 18 each is optimal.
    result = balance([8, 7, 6, 5, 4, 3, 2, 1], 2)
    assert result.loads == [18.0, 18.0]


def test_deterministic():
    costs = [random.uniform(0, 10) for _ in range(32)]
    assert balance(costs, 4) == balance(list(costs), 4)


def test_cost_model_counts_tiles_tokens_and_squares():
    model = CostModel(vit_flops_per_tile=10.0, llm_flops_per_token=1.0, llm_attention_flops_per_square_token=0.5)
    assert model.micro_batch(3, [4, 2]) == 30 + 6 + 0.5 * (16 + 4)


@pytest.mark.parametrize(
    "costs,world_size,match",
    [([1.0, 2.0, 3.0], 2, "multiple of world_size"), ([1.0, -1.0], 2, "non-negative"), ([1.0, float("nan")], 1, "finite"),
     ([1.0], 0, "world_size must be a positive int")],
)
def test_bad_input(costs, world_size, match):
    with pytest.raises(ValueError, match=match):
        balance(costs, world_size)
