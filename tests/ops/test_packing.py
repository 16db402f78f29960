import dataclasses

import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.packing import PackedSequences


@pytest.mark.parametrize(
    "lengths",
    [[3, 0, 5, 1], (3, 0, 5, 1), range(1, 5), torch.tensor([3, 0, 5, 1]), torch.tensor([3, 0, 5, 1], dtype=torch.int32)],
    ids=["list", "tuple", "range", "int64 tensor", "int32 tensor"],
)
def test_cu_seqlens_from_lengths(lengths):
    cu_seqlens = ie.cu_seqlens_from_lengths(lengths)
    expected = [0]
    for length in list(lengths):
        expected.append(expected[-1] + int(length))
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == expected


@pytest.mark.parametrize("lengths", [[], (), torch.zeros(0, dtype=torch.int64)], ids=["list", "tuple", "tensor"])
def test_empty_lengths(lengths):
    cu_seqlens = ie.cu_seqlens_from_lengths(lengths)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0]
    assert ie.max_seqlen(cu_seqlens) == 0
    packed = ie.pack_lengths(lengths)
    assert packed.cu_seqlens.tolist() == [0]
    assert (packed.max_seqlen, packed.total_tokens, packed.num_sequences) == (0, 0, 0)


def test_device_argument():
    cu_seqlens = ie.cu_seqlens_from_lengths([2, 3], device="meta")
    assert cu_seqlens.device.type == "meta" and cu_seqlens.shape == (3,)
    assert ie.pack_lengths([2, 3], device=torch.device("meta")).cu_seqlens.device.type == "meta"


def test_max_seqlen():
    assert ie.max_seqlen(torch.tensor([0, 3, 3, 10, 11], dtype=torch.int32)) == 7
    assert ie.max_seqlen(torch.tensor([0, 0, 0], dtype=torch.int32)) == 0  # only empty sequences
    assert ie.max_seqlen(torch.tensor([0], dtype=torch.int32)) == 0  # no sequences
    assert ie.max_seqlen(torch.tensor([0, 5], dtype=torch.int32)[:, None][:, 0]) == 5  # non-contiguous view


def test_pack_lengths_agrees_with_its_parts():
    lengths = [4, 0, 9, 1, 9]
    packed = ie.pack_lengths(lengths)
    assert isinstance(packed, PackedSequences)
    assert torch.equal(packed.cu_seqlens, ie.cu_seqlens_from_lengths(lengths))
    assert packed.max_seqlen == ie.max_seqlen(packed.cu_seqlens) == 9
    assert packed.total_tokens == 23 == int(packed.cu_seqlens[-1])
    assert packed.num_sequences == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        packed.max_seqlen = 3


def test_large_total_below_int32_limit():
    packed = ie.pack_lengths([2**30, 2**30 - 1])
    assert packed.cu_seqlens.tolist() == [0, 2**30, 2**31 - 1]
    assert packed.max_seqlen == 2**30


@pytest.mark.parametrize(
    "lengths,error,match",
    [
        ([3, -1], ValueError, r"lengths must be non-negative, got lengths\[1\] = -1"),
        (torch.tensor([3, -1]), ValueError, "lengths must be non-negative"),
        ([3, 2.0], TypeError, r"lengths\[1\] must be an int"),
        ([True, 2], TypeError, r"lengths\[0\] must be an int"),
        (torch.tensor([3.0, 2.0]), TypeError, "lengths must hold integers"),
        (torch.tensor([True, False]), TypeError, "lengths must hold integers"),
        (torch.tensor([[3, 2]]), ValueError, "lengths must be 1-D"),
        (torch.tensor(3), ValueError, "lengths must be 1-D"),
        (5, TypeError, "lengths must be a sequence of ints"),
        ("34", TypeError, "lengths must be a sequence of ints"),
        (None, TypeError, "lengths must be a sequence of ints"),
        ([2**31 - 1, 1], ValueError, r"lengths must sum to less than 2\*\*31"),
    ],
)
def test_bad_lengths(lengths, error, match):
    with pytest.raises(error, match=match):
        ie.cu_seqlens_from_lengths(lengths)
    with pytest.raises(error, match=match):
        ie.pack_lengths(lengths)


@pytest.mark.parametrize(
    "cu_seqlens,error,match",
    [
        ([0, 3], TypeError, "cu_seqlens must be a torch.Tensor"),
        (torch.tensor([0, 3]), TypeError, "cu_seqlens must have dtype int32"),
        (torch.tensor([[0, 3]], dtype=torch.int32), ValueError, "cu_seqlens must be 1-D"),
        (torch.zeros(0, dtype=torch.int32), ValueError, "cu_seqlens must have at least one entry"),
        (torch.tensor([2, 5], dtype=torch.int32), ValueError, "cu_seqlens must start at 0"),
        (torch.tensor([0, 5, 3], dtype=torch.int32), ValueError, "cu_seqlens must never decrease"),
    ],
)
def test_bad_cu_seqlens(cu_seqlens, error, match):
    with pytest.raises(error, match=match):
        ie.max_seqlen(cu_seqlens)


def test_cu_seqlens_check_is_remembered_until_the_tensor_changes():
    from internvl3_engine.validation import check_cu_seqlens_values

    cu_seqlens = ie.cu_seqlens_from_lengths([3, 5, 2])
    assert check_cu_seqlens_values(cu_seqlens, 10) == 5
    assert check_cu_seqlens_values(cu_seqlens, 10) == 5  # remembered: no second read
    with pytest.raises(ValueError, match="must end at the number of tokens 11"):
        check_cu_seqlens_values(cu_seqlens, 11)  # another total is checked again
    cu_seqlens[2] = 1  # in place: the version counter moves, the values are read again
    with pytest.raises(ValueError, match="must never decrease"):
        check_cu_seqlens_values(cu_seqlens, 10)


def test_checks_of_contents_work_under_inference_mode():
    # Inference tensors have no version counter: their checks are not remembered, and run every call.
    with torch.inference_mode():
        cu_seqlens = ie.cu_seqlens_from_lengths([3, 2])
        is_visual = torch.tensor([False, True, True, False, True])
        assert ie.max_seqlen(cu_seqlens) == 3
        assert ie.loss_weights(torch.randint(0, 10, (5,)), cu_seqlens).shape == (5,)
        assert ie.v2pe_position_ids(is_visual, cu_seqlens, 0.5).shape == (5,)
        assert ie.scatter_visual(torch.randn(5, 4), torch.randn(3, 4), is_visual).shape == (5, 4)
        q = torch.randn(5, 2, 16)
        assert ie.v2pe_attention(q, q, q, cu_seqlens, 3, torch.arange(5.0)).shape == (5, 2, 16)
        cu_seqlens[1] = 6  # in place, untracked: checked again all the same
        with pytest.raises(ValueError, match="must never decrease"):
            ie.max_seqlen(cu_seqlens)
        is_visual[0] = True
        with pytest.raises(ValueError, match="is_visual marks 4 visual tokens"):
            ie.scatter_visual(torch.randn(5, 4), torch.randn(3, 4), is_visual)
