import math
import random

import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.ops.v2pe_positions import v2pe_position_ids, v2pe_positions_reference

from helpers import backends_for, devices

V2PE_DELTAS = [2.0**-j for j in range(9)]  # {1, 1/2, ..., 1/256}, as in training
# Deltas whose float64 sums round: 2^-60 is lost when added to pos = -1 or pos >= 1 but not to pos = 0, so
# an image's end position depends on the position before it; 1e-40 is a float32 subnormal.
ROUNDING_DELTAS = [2.0**-60, 1e-40]


def loop_positions(is_visual, cu_seqlens, delta):
    """The V2PE rule transcribed literally, one token at a time, in Python floats (IEEE float64)."""
    visual = is_visual.tolist()
    bounds = cu_seqlens.tolist()
    deltas = delta.tolist() if isinstance(delta, torch.Tensor) else None
    out = [0.0] * len(visual)
    image = 0
    for b in range(len(bounds) - 1):
        pos = -1.0
        t = bounds[b]
        while t < bounds[b + 1]:
            if not visual[t]:
                pos = pos + 1
                out[t] = pos
                t += 1
                continue
            n = 0
            while t + n < bounds[b + 1] and visual[t + n]:
                n += 1
            d = deltas[image] if deltas is not None else delta
            for k in range(1, n + 1):
                out[t + k - 1] = pos + k * d
            pos = float(math.ceil(pos + n * d))
            image += 1
            t += n
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


def random_pack(rng, tokens, segments, max_run=12):
    """Alternating text and visual runs of random lengths over the whole pack (so runs cross segment
    boundaries), cut into segments of random lengths, empty and length-1 ones included."""
    flags = []
    visual = rng.random() < 0.5
    while len(flags) < tokens:
        flags += [visual] * rng.randint(1, max_run)
        visual = not visual
    cuts = sorted(rng.randint(0, tokens) for _ in range(segments - 1))
    for i in range(1, len(cuts)):
        chance = rng.random()
        if chance < 0.15:
            cuts[i] = cuts[i - 1]  # an empty segment
        elif chance < 0.3:
            cuts[i] = min(cuts[i - 1] + 1, tokens)  # a segment of one token
    cuts.sort()
    return torch.tensor(flags[:tokens], dtype=torch.bool), torch.tensor([0, *cuts, tokens], dtype=torch.int32)


def num_images(is_visual, cu_seqlens):
    visual, bounds = is_visual.tolist(), cu_seqlens.tolist()
    return sum(
        1
        for begin, end in zip(bounds[:-1], bounds[1:])
        for t in range(begin, end)
        if visual[t] and (t == begin or not visual[t - 1])
    )


def per_image_deltas(rng, count, choices, device="cpu"):
    return torch.tensor([rng.choice(choices) for _ in range(count)], dtype=torch.float32, device=device)


def pack(*segments):
    """is_visual and cu_seqlens of segments written as strings of 't' (text) and 'v' (visual)."""
    flags = [c == "v" for segment in segments for c in segment]
    bounds = [0]
    for segment in segments:
        bounds.append(bounds[-1] + len(segment))
    return torch.tensor(flags, dtype=torch.bool), torch.tensor(bounds, dtype=torch.int32)


def all_backends(is_visual, cu_seqlens, delta):
    """Positions from every backend present for is_visual's device, each checked equal to the reference."""
    delta_tensor = delta if isinstance(delta, torch.Tensor) else None
    expected = v2pe_positions_reference(is_visual, cu_seqlens, delta_tensor, 1.0 if delta_tensor is not None else delta)
    for kind in backends_for(is_visual.device):
        with ie.backend(kind):
            out = v2pe_position_ids(is_visual, cu_seqlens, delta)
        assert out.dtype == torch.float32 and out.shape == is_visual.shape
        assert torch.equal(out, expected), f"{kind}: {out} != reference {expected}"
    return expected


def test_worked_example_by_hand():
    # pos = -1; t -> 0; t -> 1; image of 3 at pos 1: 1.5, 2.0, 2.5, pos = ceil(1 + 3 * 0.5) = 3; t -> 4.
    is_visual, cu_seqlens = pack("ttvvvt")
    expected = torch.tensor([0, 1, 1.5, 2.0, 2.5, 4])
    assert torch.equal(all_backends(is_visual, cu_seqlens, 0.5), expected)
    # delta 1/4: 1.25, 1.5, 1.75, pos = ceil(1.75) = 2; t -> 3. Second segment: image of 2 at pos -1 with
    # delta 1/2: -0.5, 0.0, pos = ceil(0) = 0; t -> 1; image of 1 at pos 1 with delta 1: 2, pos = 2.
    is_visual, cu_seqlens = pack("ttvvvt", "vvtv")
    expected = torch.tensor([0, 1, 1.25, 1.5, 1.75, 3, -0.5, 0.0, 1, 2])
    assert torch.equal(all_backends(is_visual, cu_seqlens, torch.tensor([0.25, 0.5, 1.0])), expected)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_delta_one_gives_arange_per_segment(device):
    rng = random.Random(torch.initial_seed())
    is_visual, cu_seqlens = random_pack(rng, 300, 7)
    is_visual, cu_seqlens = is_visual.to(device), cu_seqlens.to(device)
    expected = torch.cat([torch.arange(int(b - a), dtype=torch.float32) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])])
    assert torch.equal(all_backends(is_visual, cu_seqlens, 1.0).cpu(), expected)
    ones = torch.ones(num_images(is_visual, cu_seqlens), device=device)
    assert torch.equal(all_backends(is_visual, cu_seqlens, ones).cpu(), expected)


@pytest.mark.parametrize("choices", [V2PE_DELTAS, ROUNDING_DELTAS + [1.0, 0.5], "random"], ids=["v2pe", "rounding", "random"])
def test_reference_matches_the_literal_rule_on_random_packs(choices):
    rng = random.Random(torch.initial_seed())
    for _ in range(20):
        is_visual, cu_seqlens = random_pack(rng, rng.randint(0, 200), rng.randint(1, 9))
        count = num_images(is_visual, cu_seqlens)
        deltas = torch.rand(count).clamp(min=1e-6) if choices == "random" else per_image_deltas(rng, count, choices)
        assert torch.equal(v2pe_positions_reference(is_visual, cu_seqlens, deltas, 1.0), loop_positions(is_visual, cu_seqlens, deltas))
        scalar = float(deltas[0]) if count else 0.25
        assert torch.equal(v2pe_positions_reference(is_visual, cu_seqlens, None, scalar), loop_positions(is_visual, cu_seqlens, scalar))


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("choices", [V2PE_DELTAS, ROUNDING_DELTAS + [1.0, 0.5], "random"], ids=["v2pe", "rounding", "random"])
def test_every_backend_equals_reference(device, choices):
    rng = random.Random(torch.initial_seed())
    for tokens, segments in [(1, 1), (257, 3), (1000, 11), (64, 40)]:
        is_visual, cu_seqlens = random_pack(rng, tokens, segments)
        count = num_images(is_visual, cu_seqlens)
        deltas = torch.rand(count).clamp(min=1e-6) if choices == "random" else per_image_deltas(rng, count, choices)
        is_visual, cu_seqlens, deltas = is_visual.to(device), cu_seqlens.to(device), deltas.to(device)
        all_backends(is_visual, cu_seqlens, deltas)
        all_backends(is_visual, cu_seqlens, float(deltas[0]) if count else 0.5)


def test_per_image_deltas_follow_order_of_appearance():
    # Images numbered across the pack: segment 0 has images 0, 1; segment 1 has image 2.
    is_visual, cu_seqlens = pack("vvvvtvv", "tvvvv")
    out = all_backends(is_visual, cu_seqlens, torch.tensor([1 / 4, 1 / 256, 1 / 2]))
    # img 0 at -1: -0.75 .. 0, pos 0; t 1; img 1 at 1: 1 + k/256, pos 2. t 0; img 2 at 0: 0.5 .. 2, pos 2.
    expected = torch.tensor([-0.75, -0.5, -0.25, 0.0, 1, 1 + 1 / 256, 1 + 2 / 256, 0, 0.5, 1.0, 1.5, 2.0])
    assert torch.equal(out, expected)


def test_positions_near_30k_stay_exact():
    is_visual = torch.tensor([False] * 30_000 + [True] * 256 + [False] * 3 + [True] * 512)
    cu_seqlens = torch.tensor([0, is_visual.shape[0]], dtype=torch.int32)
    out = all_backends(is_visual, cu_seqlens, torch.tensor([1 / 256, 1 / 128]))
    k = torch.arange(1, 257, dtype=torch.float64)
    assert torch.equal(out[:30_000].double(), torch.arange(30_000, dtype=torch.float64))
    assert torch.equal(out[30_000:30_256].double(), 29_999 + k / 256)
    assert torch.equal(out[30_256:30_259].double(), torch.tensor([30_001.0, 30_002.0, 30_003.0], dtype=torch.float64))
    assert torch.equal(out[30_259:].double(), 30_003 + torch.arange(1, 513, dtype=torch.float64) / 128)


def test_images_at_segment_boundaries_are_split():
    # One visual run of 6 crosses the boundary: two images of 3. The second starts its segment at pos -1:
    # -0.75, -0.5, -0.25, then pos = ceil(-0.25) = 0, and the text tokens take 1, 2.
    is_visual, cu_seqlens = pack("ttvvv", "vvvtt")
    out = all_backends(is_visual, cu_seqlens, torch.tensor([0.5, 0.25]))
    assert torch.equal(out, torch.tensor([0, 1, 1.5, 2.0, 2.5, -0.75, -0.5, -0.25, 1, 2]))
    with pytest.raises(ValueError, match="delta must have one entry per image: got 1 deltas for 2 images"):
        v2pe_position_ids(is_visual, cu_seqlens, torch.tensor([0.5]))


@pytest.mark.parametrize("device", devices(), ids=str)
def test_empty_pack_and_empty_segments(device):
    for bounds in ([0], [0, 0], [0, 0, 0]):
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        is_visual = torch.zeros(0, dtype=torch.bool, device=device)
        assert all_backends(is_visual, cu_seqlens, 0.5).shape == (0,)
        assert all_backends(is_visual, cu_seqlens, torch.zeros(0, device=device)).shape == (0,)
    is_visual, cu_seqlens = pack("", "v", "", "t", "vv", "")
    is_visual, cu_seqlens = is_visual.to(device), cu_seqlens.to(device)
    out = all_backends(is_visual, cu_seqlens, torch.tensor([1 / 2, 1 / 4], device=device))
    assert torch.equal(out.cpu(), torch.tensor([-0.5, 0, -0.75, -0.5]))


def test_all_visual_segments():
    is_visual, cu_seqlens = pack("vvvv", "vv", "v")
    out = all_backends(is_visual, cu_seqlens, torch.tensor([1.0, 1 / 2, 1 / 256]))
    assert torch.equal(out, torch.tensor([0, 1, 2, 3, -0.5, 0, -1 + 1 / 256]))


def test_noncontiguous_inputs_are_handled():
    is_visual, cu_seqlens = pack("ttvvtvvv", "tvt")
    strided = torch.stack([is_visual, ~is_visual], 1)[:, 0]
    assert not strided.is_contiguous()
    torch.testing.assert_close(v2pe_position_ids(strided, cu_seqlens, 0.5), v2pe_position_ids(is_visual, cu_seqlens, 0.5))


def test_opcheck():
    is_visual, cu_seqlens = pack("ttvvvt", "vvtvt", "")
    op = torch.ops.internvl3_engine.v2pe_position_ids.default
    torch.library.opcheck(op, (is_visual, cu_seqlens, torch.tensor([0.5, 0.25, 1 / 256]), 1.0))
    torch.library.opcheck(op, (is_visual, cu_seqlens, None, 0.125))


@pytest.mark.parametrize("tensor_delta", [False, True], ids=["float_delta", "tensor_delta"])
def test_torch_compile_fullgraph(tensor_delta):
    def positions_times_two(is_visual, cu_seqlens, delta):
        return v2pe_position_ids(is_visual, cu_seqlens, delta) * 2

    is_visual, cu_seqlens = pack("ttvvvt", "vvtvt")
    delta = torch.tensor([0.5, 0.25, 0.125]) if tensor_delta else 0.25
    compiled = torch.compile(positions_times_two, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(is_visual, cu_seqlens, delta), positions_times_two(is_visual, cu_seqlens, delta))


def test_output_is_not_differentiable():
    is_visual, cu_seqlens = pack("tvvt")
    delta = torch.tensor([0.5], requires_grad=True)
    assert not v2pe_position_ids(is_visual, cu_seqlens, delta).requires_grad


def _bad(**kwargs):
    is_visual, cu_seqlens = pack("ttvvt", "vt")
    args = dict(is_visual=is_visual, cu_seqlens=cu_seqlens, delta=0.5)
    args.update(kwargs)
    return args


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(is_visual=torch.zeros(7, dtype=torch.uint8)), TypeError, "is_visual must have dtype bool"),
        (dict(is_visual=[False] * 7), TypeError, "is_visual must be a torch.Tensor"),
        (dict(is_visual=torch.zeros(7, 1, dtype=torch.bool)), ValueError, "is_visual must be 1-D"),
        (dict(cu_seqlens=torch.tensor([0, 5, 7])), TypeError, "cu_seqlens must have dtype int32"),
        (dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens must have at least one entry"),
        (dict(cu_seqlens=torch.tensor([1, 5, 7], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens must never decrease"),
        (dict(cu_seqlens=torch.tensor([0, 5, 6], dtype=torch.int32)), ValueError, "cu_seqlens must end at the number of tokens 7"),
        (dict(cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens must be on cpu"),
        (dict(delta=0.0), ValueError, r"delta must be finite and in \(0, 1\]"),
        (dict(delta=-0.5), ValueError, r"delta must be finite and in \(0, 1\]"),
        (dict(delta=float("nan")), ValueError, r"delta must be finite and in \(0, 1\]"),
        (dict(delta=float("inf")), ValueError, r"delta must be finite and in \(0, 1\]"),
        (dict(delta=2.0), ValueError, r"delta must be finite and in \(0, 1\]"),
        (dict(delta="1/4"), TypeError, "delta must be a float"),
        (dict(delta=True), TypeError, "delta must be a float"),
        (dict(delta=torch.tensor([0.5, 0.5], dtype=torch.float64)), TypeError, "delta must have dtype float32"),
        (dict(delta=torch.tensor([[0.5, 0.5]])), ValueError, "delta must be 1-D"),
        (dict(delta=torch.tensor([0.5, 0.5], device="meta")), ValueError, "delta must be on cpu"),
        (dict(delta=torch.tensor([0.5, 0.0])), ValueError, r"delta must be finite and in \(0, 1\].*got delta\[1\] = 0.0"),
        (dict(delta=torch.tensor([float("nan"), 0.5])), ValueError, r"got delta\[0\] = nan"),
        (dict(delta=torch.tensor([0.5, 1.5])), ValueError, r"got delta\[1\] = 1.5"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        v2pe_position_ids(**_bad(**kwargs))


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("length", [1, 3, 0])
def test_wrong_number_of_deltas_raises_in_every_backend(device, length):
    args = _bad(delta=torch.full((length,), 0.5, device=device))
    args["is_visual"], args["cu_seqlens"] = args["is_visual"].to(device), args["cu_seqlens"].to(device)
    for kind in backends_for(torch.device(device)):
        with ie.backend(kind), pytest.raises(ValueError, match=f"delta must have one entry per image: got {length} deltas for 2 images"):
            v2pe_position_ids(**args)


@pytest.mark.gpu
def test_gpu_32k_pack_per_image_deltas():
    rng = random.Random(torch.initial_seed())
    is_visual, cu_seqlens = random_pack(rng, 32_768, 8, max_run=600)
    deltas = per_image_deltas(rng, num_images(is_visual, cu_seqlens), V2PE_DELTAS)
    expected = loop_positions(is_visual, cu_seqlens, deltas)
    for kind in ("torch", "cuda"):
        with ie.backend(kind):
            out = v2pe_position_ids(is_visual.cuda(), cu_seqlens.cuda(), deltas.cuda())
        assert torch.equal(out.cpu(), expected), kind
