import math

import numpy as np
import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.ops.loss_weights import MODES, loss_weights_reference
from internvl3_engine.ops.loss_weights.reference import count_weights, sqrt_rn

from helpers import backends_for, devices


def _pack(lengths, device, labels_dtype=torch.int64, ignore_index=-100, supervised_fraction=0.7):
    """Random labels for segments of ``lengths`` (about ``supervised_fraction`` supervised), and cu_seqlens."""
    cu_seqlens = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=device)
    tokens = int(sum(lengths))
    labels = torch.randint(0, 151_000, (tokens,), dtype=labels_dtype)
    labels[torch.rand(tokens) > supervised_fraction] = ignore_index
    return labels.to(device), cu_seqlens


def _float32_weight(x, mode):
    """The weight computed independently with numpy's correctly rounded float32 arithmetic."""
    one, x = np.float32(1.0), np.float32(x)
    return {"token": one, "sample": one / x, "square": one / np.sqrt(x)}[mode]


PACKS = [  # segment lengths
    [1],
    [0, 5, 0, 1, 1, 7],  # empty and length-1 segments
    [300, 17, 64],  # a segment longer than a warp or a small block
    [13, 0, 29, 2, 41],
]


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("lengths", PACKS, ids=str)
@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32], ids=str)
def test_backends_equal_bit_for_bit(device, lengths, labels_dtype):
    for ignore_index in (-100, 0):
        labels, cu_seqlens = _pack(lengths, device, labels_dtype, ignore_index)
        labels[: max(1, lengths[0])] = ignore_index  # the first segment has no supervised tokens
        for mode in MODES:
            expected = loss_weights_reference(labels, cu_seqlens, mode, ignore_index)
            assert expected.dtype == torch.float32 and expected.shape == labels.shape
            for kind in backends_for(device):
                with ie.backend(kind):
                    weights = ie.loss_weights(labels, cu_seqlens, mode, ignore_index)
                assert torch.equal(weights, expected), f"{kind} {mode} ignore_index={ignore_index}"


@pytest.mark.parametrize("device", devices(), ids=str)
def test_weights_are_correctly_rounded(device):
    """Every count from 1 to 160 (a fully supervised segment each), plus large ones: the bits equal numpy's
    correctly rounded float32 1/x and 1/sqrt(x) on every backend."""
    counts = list(range(1, 161)) + [1000, 4097]
    labels = torch.ones(sum(counts), dtype=torch.int64, device=device)
    cu_seqlens = torch.tensor([0] + list(np.cumsum(counts)), dtype=torch.int32, device=device)
    owner = np.repeat(np.array(counts), counts)
    for mode in MODES:
        expected = torch.from_numpy(np.array([_float32_weight(x, mode) for x in owner], dtype=np.float32)).to(device)
        for kind in backends_for(device):
            with ie.backend(kind):
                assert torch.equal(ie.loss_weights(labels, cu_seqlens, mode), expected), f"{kind} {mode}"


def test_reference_sqrt_is_correctly_rounded():
    """The reference's float32 sqrt and weights equal numpy's correctly rounded float32 ones for every count
    in [1, 2^24) and for random positive float32 values. torch.sqrt alone is not correctly rounded on CPU
    (MKL VML; sqrt(19) is 1 ulp off), which made the reference's 'square' weights 1 ulp from the kernels'."""
    for low in range(1, 1 << 24, 1 << 21):
        x = np.arange(low, min(low + (1 << 21), 1 << 24), dtype=np.float32)
        root = np.sqrt(x)
        assert np.array_equal(sqrt_rn(torch.from_numpy(x)).numpy(), root), low
        assert np.array_equal(count_weights(torch.from_numpy(x), "square").numpy(), np.float32(1.0) / root), low
        assert np.array_equal(count_weights(torch.from_numpy(x), "sample").numpy(), np.float32(1.0) / x), low
    bits = torch.randint(0, 0x7F800000, (1 << 20,), dtype=torch.int32)  # bits of finite float32s >= 0, subnormals included
    x = bits.view(torch.float32)
    assert np.array_equal(sqrt_rn(x).numpy(), np.sqrt(x.numpy()))


def test_documented_meaning():
    """Summed over a sample's supervised tokens, w gives 1 ('sample'), sqrt(x) ('square'), x ('token');
    unsupervised tokens weigh 0."""
    lengths = [9, 0, 300, 1, 40]
    labels, cu_seqlens = _pack(lengths, "cpu")
    labels[9 + 3] = 5  # the 300-long segment has at least one supervised token
    for kind in backends_for(torch.device("cpu")):
        with ie.backend(kind):
            weights = {mode: ie.loss_weights(labels, cu_seqlens, mode) for mode in MODES}
        for s in range(len(lengths)):
            start, stop = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
            supervised = labels[start:stop] != -100
            x = int(supervised.sum())
            for mode in MODES:
                w = weights[mode][start:stop].double()
                assert (w[~supervised] == 0).all(), f"{kind} {mode}"
                if x:
                    expected = {"token": x, "sample": 1.0, "square": math.sqrt(x)}[mode]
                    assert w[supervised].sum().item() == pytest.approx(expected, rel=1e-6), f"{kind} {mode} x={x}"


@pytest.mark.parametrize("device", devices(), ids=str)
def test_empty_pack(device):
    for kind in backends_for(device):
        for cu in ([0], [0, 0, 0]):
            with ie.backend(kind):
                weights = ie.loss_weights(
                    torch.empty(0, dtype=torch.int64, device=device), torch.tensor(cu, dtype=torch.int32, device=device)
                )
            assert weights.shape == (0,) and weights.dtype == torch.float32, kind


def test_noncontiguous_labels_are_handled():
    labels, cu_seqlens = _pack([4, 6, 2], "cpu")
    strided = torch.stack([labels, labels], dim=1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(ie.loss_weights(strided, cu_seqlens), ie.loss_weights(labels, cu_seqlens))


def test_opcheck():
    labels, cu_seqlens = _pack([5, 0, 7, 1], "cpu")
    for mode in MODES:
        torch.library.opcheck(torch.ops.internvl3_engine.loss_weights.default, (labels, cu_seqlens, mode, -100))


def test_torch_compile_fullgraph():
    def weighted_loss(logits, labels, cu_seqlens):
        weights = ie.loss_weights(labels, cu_seqlens, "square")
        losses = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return (weights * losses).sum() / weights.sum()

    labels, cu_seqlens = _pack([6, 3, 8], "cpu")
    labels = labels % 11
    labels[0] = -100
    logits = torch.randn(17, 11)
    compiled = torch.compile(weighted_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, labels, cu_seqlens), weighted_loss(logits, labels, cu_seqlens))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(labels=[1, 2, 3, 4]), TypeError, "labels must be a torch.Tensor"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must have dtype int64, int32"),
        (dict(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels must be 1-D"),
        (dict(cu_seqlens=torch.tensor([0, 4])), TypeError, "cu_seqlens must have dtype int32"),
        (dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens must have at least one entry"),
        (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens must be on cpu"),
        (dict(cu_seqlens=torch.tensor([1, 4], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), ValueError, "cu_seqlens must never decrease"),
        (dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cu_seqlens must end at the number of tokens 4"),
        (dict(mode="mean"), ValueError, "mode must be one of"),
        (dict(mode=2), TypeError, "mode must be a str"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(labels=torch.tensor([-100, 2, 3, -100]), cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ie.loss_weights(**args)


@pytest.mark.gpu
def test_gpu_real_pack():
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.rand(30, generator=generator) * 1000 + 50).long()
    lengths[-1] += 16384 - int(lengths.sum())  # a 16k pack of 30 samples
    lengths[3] = 0
    for labels_dtype in (torch.int64, torch.int32):
        labels, cu_seqlens = _pack(lengths.tolist(), device, labels_dtype)
        labels[: int(lengths[0])] = -100  # a sample with no supervised tokens (a pure image caption prompt)
        for mode in MODES:
            expected = loss_weights_reference(labels, cu_seqlens, mode)
            for kind in ("triton", "cuda"):
                with ie.backend(kind):
                    assert torch.equal(ie.loss_weights(labels, cu_seqlens, mode), expected), f"{kind} {mode} {labels_dtype}"
