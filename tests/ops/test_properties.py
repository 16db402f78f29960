"""Property-based tests (hypothesis) of the index-math ops on the CPU backends (the PyTorch reference and the
C++ kernels that share their index math with the CUDA kernels): any pack hypothesis can build, including
empty packs, empty and length-1 segments, images at segment boundaries and per-image deltas."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import internvl3_engine as ie
from helpers import backends_for
from test_loss_weights import _float32_weight
from test_v2pe_positions import loop_positions

CPU = torch.device("cpu")
# The Triton interpreter is too slow for hundreds of examples; Triton is covered by each op's own tests.
BACKENDS = [kind for kind in backends_for(CPU) if kind != "triton"]
DELTAS = [2.0**-k for k in range(9)]  # InternVL3's {1, 1/2, ..., 1/256}
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def packs(draw, max_segments: int = 5, max_length: int = 24):
    """(is_visual bool [T], cu_seqlens int32 [B+1]) with visual runs anywhere, boundaries included."""
    lengths = draw(st.lists(st.integers(0, max_length), min_size=0, max_size=max_segments))
    tokens = sum(lengths)
    visual = draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens))
    return torch.tensor(visual, dtype=torch.bool), ie.cu_seqlens_from_lengths(lengths)


def count_images(is_visual: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """Maximal visual runs within segments (a run crossing a segment boundary is two images)."""
    visual, bounds = is_visual.tolist(), cu_seqlens.tolist()
    return sum(
        visual[t] and (t == start or not visual[t - 1])
        for start, end in zip(bounds[:-1], bounds[1:])
        for t in range(start, end)
    )


@PROPERTY_SETTINGS
@given(pack=packs(), delta=st.sampled_from(DELTAS), data=st.data())
def test_v2pe_positions_follow_the_literal_rule_on_every_backend(pack, delta, data):
    is_visual, cu_seqlens = pack
    images = count_images(is_visual, cu_seqlens)
    per_image = torch.tensor(data.draw(st.lists(st.sampled_from(DELTAS), min_size=images, max_size=images)), dtype=torch.float32)
    for given_delta in (delta, per_image):
        expected = loop_positions(is_visual, cu_seqlens, given_delta)
        for kind in BACKENDS:
            with ie.backend(kind):
                out = ie.v2pe_position_ids(is_visual, cu_seqlens, given_delta)
            assert torch.equal(out, expected), f"{kind}: {out} != {expected}"


@PROPERTY_SETTINGS
@given(pack=packs(), data=st.data())
def test_loss_weights_follow_their_definition_on_every_backend(pack, data):
    _, cu_seqlens = pack
    tokens = int(cu_seqlens[-1])
    labels = torch.tensor(data.draw(st.lists(st.sampled_from([-100, 0, 5, 7]), min_size=tokens, max_size=tokens)), dtype=torch.long)
    for mode in ("token", "sample", "square"):
        expected = torch.zeros(tokens, dtype=torch.float32)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            supervised = labels[start:end] != -100
            x = int(supervised.sum())
            if x:
                expected[start:end][supervised] = float(_float32_weight(x, mode))  # float32 arithmetic, as documented
        for kind in BACKENDS:
            with ie.backend(kind):
                assert torch.equal(ie.loss_weights(labels, cu_seqlens, mode), expected), f"{kind} {mode}"


@PROPERTY_SETTINGS
@given(pack=packs(max_segments=3, max_length=30), channels=st.integers(1, 9))
def test_scatter_visual_puts_every_row_in_its_place(pack, channels):
    is_visual, _ = pack
    text = torch.randn(len(is_visual), channels)
    visual = torch.randn(int(is_visual.sum()), channels)
    for kind in BACKENDS:
        with ie.backend(kind):
            out = ie.scatter_visual(text, visual, is_visual)
        assert torch.equal(out[is_visual], visual) and torch.equal(out[~is_visual], text[~is_visual]), kind


@PROPERTY_SETTINGS
@given(tiles=st.integers(0, 3), half_side=st.integers(1, 4), channels=st.integers(1, 5))
def test_pixel_unshuffle_is_a_permutation_into_2x2_groups(tiles, half_side, channels):
    side = 2 * half_side
    x = torch.randperm(tiles * side * side * channels).float().reshape(tiles, side, side, channels)
    outs = []
    for kind in BACKENDS:
        with ie.backend(kind):
            outs.append(ie.pixel_unshuffle(x))
    for out in outs:
        assert out.shape == (tiles, half_side, half_side, 4 * channels)
        assert torch.equal(out, outs[0])
        assert torch.equal(out.flatten().sort().values, x.flatten().sort().values)  # nothing lost or repeated
        # each output pixel holds exactly the 2x2 input block at (2i, 2j)
        for n, i, j in ((0, 0, 0), (tiles - 1, half_side - 1, half_side - 1)) if tiles else ():
            block = x[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten()
            assert torch.equal(out[n, i, j].sort().values, block.sort().values)


@PROPERTY_SETTINGS
@given(lengths=st.lists(st.integers(0, 10_000), max_size=20))
def test_pack_helpers_agree(lengths):
    cu_seqlens = ie.cu_seqlens_from_lengths(lengths)
    packed = ie.pack_lengths(lengths)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0
    assert torch.equal(cu_seqlens.diff(), torch.tensor(lengths, dtype=torch.int32))
    assert torch.equal(packed.cu_seqlens, cu_seqlens) and packed.total_tokens == sum(lengths)
    assert packed.max_seqlen == max(lengths, default=0) == ie.max_seqlen(cu_seqlens)
