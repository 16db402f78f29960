import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.ops.scatter_visual import (
    SCATTER_VISUAL,
    SCATTER_VISUAL_BACKWARD,
    scatter_visual,
    scatter_visual_backward_reference,
    scatter_visual_reference,
)

from helpers import backends_for, devices, dtypes_for


def _mask(tokens, pattern):
    if pattern == "random":
        return torch.rand(tokens) < 0.5
    if pattern == "all":
        return torch.ones(tokens, dtype=torch.bool)
    if pattern == "none":
        return torch.zeros(tokens, dtype=torch.bool)
    # InternVL layout: text, then <img> + a run of <IMG_CONTEXT> + </img>, twice.
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[3 : tokens // 2] = True
    mask[tokens // 2 + 2 : tokens - 2] = True
    return mask


CASES = [  # tokens, width, visual pattern
    (1, 8, "all"),
    (1, 8, "none"),
    (23, 37, "random"),  # width not a multiple of any vector or block size
    (40, 64, "images"),
    (17, 96, "all"),
    (12, 16, "none"),
    (6, 9000, "random"),  # wider than one Triton block: the column loop
]


def _inputs(tokens, width, pattern, device, dtype):
    mask = _mask(tokens, pattern).to(device)
    text = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    visual = torch.randn(int(mask.sum()), width, device=device, dtype=dtype, requires_grad=True)
    return text, visual, mask


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("tokens,width,pattern", CASES)
def test_forward_backward_exact(device, tokens, width, pattern):
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind) + [torch.float64]:
            text, visual, mask = _inputs(tokens, width, pattern, device, dtype)
            with ie.backend(kind):  # the backward too runs on the backend under test
                out = scatter_visual(text, visual, mask)
                grad = torch.randn_like(out)
                grad_text, grad_visual = torch.autograd.grad(out, (text, visual), grad)
            expected_text, expected_visual = scatter_visual_backward_reference(grad, mask)
            assert torch.equal(out, scatter_visual_reference(text.detach(), visual.detach(), mask)), f"{kind} {dtype}"
            assert torch.equal(grad_text, expected_text), f"{kind} {dtype} grad_text"
            assert torch.equal(grad_visual, expected_visual), f"{kind} {dtype} grad_visual"


def test_reference_places_rows_in_order():
    """Written out: the (j+1)-th visual token takes visual row j; the other rows keep their text row."""
    mask = torch.tensor([False, True, True, False, True, False])
    text = torch.arange(6.0)[:, None].repeat(1, 3)
    visual = -torch.arange(1.0, 4.0)[:, None].repeat(1, 3)
    out = ie.scatter_visual(text, visual, mask)
    assert out[:, 0].tolist() == [0.0, -1.0, -2.0, 3.0, -3.0, 5.0]
    grad_text, grad_visual = scatter_visual_backward_reference(text, mask)
    assert grad_text[:, 0].tolist() == [0.0, 0.0, 0.0, 3.0, 0.0, 5.0]
    assert grad_visual[:, 0].tolist() == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("device", devices(), ids=str)
def test_empty(device):
    for kind in backends_for(device):
        for width in (0, 8):
            text = torch.empty(0, width, device=device, requires_grad=True)
            visual = torch.empty(0, width, device=device, requires_grad=True)
            with ie.backend(kind):
                out = ie.scatter_visual(text, visual, torch.empty(0, dtype=torch.bool, device=device))
                grad_text, grad_visual = torch.autograd.grad(out, (text, visual), out)
            assert out.shape == (0, width)
            assert grad_text.shape == (0, width) and grad_visual.shape == (0, width)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_kernels_bound_check_visual_rows(device):
    """A visual row index past visual_embeds (a direct call with inconsistent metadata) is never read:
    that token keeps its text row, and its gradient goes to the text."""
    text = torch.randn(4, 8, device=device)
    visual = torch.randn(1, 8, device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    before = torch.tensor([0, 1, 1, 5], device=device)
    expected = torch.stack([visual[0], text[1], text[2], text[3]])
    expected_grad_text = torch.stack([torch.zeros(8, device=device), text[1], text[2], text[3]])
    for kind in backends_for(device):
        if kind == "torch":
            continue
        kernels, backward_kernels = getattr(SCATTER_VISUAL, kind), getattr(SCATTER_VISUAL_BACKWARD, kind)
        assert torch.equal(kernels(text, visual, mask, before), expected), kind
        grad_text, grad_visual = backward_kernels(text, mask, before, 1)
        assert torch.equal(grad_text, expected_grad_text) and torch.equal(grad_visual, text[:1]), kind


def test_double_backward():
    text, visual, mask = _inputs(9, 5, "random", "cpu", torch.float64)
    for kind in backends_for(torch.device("cpu")):
        with ie.backend(kind):
            assert torch.autograd.gradcheck(lambda a, b: ie.scatter_visual(a, b, mask), (text, visual), fast_mode=True)
            assert torch.autograd.gradgradcheck(lambda a, b: ie.scatter_visual(a, b, mask), (text, visual), fast_mode=True)


def test_noncontiguous_input_is_handled():
    mask = torch.rand(8) < 0.5
    text = torch.randn(16, 8).t()
    visual = torch.randn(16, int(mask.sum())).t()
    assert torch.equal(ie.scatter_visual(text, visual, mask), scatter_visual_reference(text, visual, mask))


def test_count_mismatch_raises():
    mask = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="visual_embeds .*3 visual tokens, visual_embeds has 2 rows"):
        ie.scatter_visual(torch.randn(4, 8), torch.randn(2, 8), mask)
    with pytest.raises(ValueError, match="visual_embeds .*3 visual tokens, visual_embeds has 4 rows"):
        torch.ops.internvl3_engine.scatter_visual_backward(torch.randn(4, 8), mask, 4)


def test_opcheck():
    mask = torch.tensor([True, False, True, True, False, True])
    text = torch.randn(6, 8)
    visual = torch.randn(4, 8)
    torch.library.opcheck(torch.ops.internvl3_engine.scatter_visual.default, (text, visual, mask))
    torch.library.opcheck(torch.ops.internvl3_engine.scatter_visual_backward.default, (text, mask, 4))


def test_torch_compile_fullgraph():
    def embed(text, visual, mask):
        return (ie.scatter_visual(text * 2, visual, mask) ** 2).sum()

    mask = torch.rand(11) < 0.5
    text = torch.randn(11, 16, requires_grad=True)
    visual = torch.randn(int(mask.sum()), 16, requires_grad=True)
    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    loss, expected = compiled(text, visual, mask), embed(text, visual, mask)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (text, visual))
    expected_grads = torch.autograd.grad(expected, (text, visual))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(text_embeds=[[0.0]]), TypeError, "text_embeds must be a torch.Tensor"),
        (dict(text_embeds=torch.zeros(4, 8, dtype=torch.int64)), TypeError, "text_embeds must have dtype"),
        (dict(text_embeds=torch.zeros(4, 8, 1)), ValueError, "text_embeds must be 2-D"),
        (dict(visual_embeds=torch.zeros(2, 8, dtype=torch.float16)), TypeError, "visual_embeds must have the dtype"),
        (dict(visual_embeds=torch.zeros(2, 8, device="meta")), ValueError, "visual_embeds must be on cpu"),
        (dict(visual_embeds=torch.zeros(2, 7)), ValueError, "visual_embeds must have the row size of text_embeds"),
        (dict(visual_embeds=torch.zeros(16)), ValueError, "visual_embeds must be 2-D"),
        (dict(visual_embeds=torch.zeros(3, 8)), ValueError, "visual_embeds must have one row per visual token"),
        (dict(is_visual=torch.tensor([1, 0, 1, 0])), TypeError, "is_visual must have dtype bool"),
        (dict(is_visual=torch.tensor([True, False, True])), ValueError, "is_visual must have 4 rows"),
        (dict(is_visual=torch.ones(4, 1, dtype=torch.bool)), ValueError, "is_visual must be 1-D"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(text_embeds=torch.zeros(4, 8), visual_embeds=torch.zeros(2, 8), is_visual=torch.tensor([True, False, True, False]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ie.scatter_visual(**args)


@pytest.mark.gpu
def test_gpu_bfloat16_real_size():
    device = torch.device("cuda")
    tokens, width = 16384, 3584
    mask = torch.zeros(tokens, dtype=torch.bool)
    for start in range(100, tokens - 300, 2100):  # images of 2 tiles (512 <IMG_CONTEXT>) between text
        mask[start : start + 512] = True
    mask = mask.to(device)
    text = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    visual = torch.randn(int(mask.sum()), width, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(text)
    expected = scatter_visual_reference(text, visual, mask)
    expected_grads = scatter_visual_backward_reference(grad, mask)
    for kind in ("triton", "cuda"):
        with ie.backend(kind):
            assert torch.equal(ie.scatter_visual(text, visual, mask), expected), kind
            grads = torch.ops.internvl3_engine.scatter_visual_backward(grad, mask, visual.shape[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads)), kind


def test_count_check_reads_each_mask_once(monkeypatch):
    # The visual count is a host sync on a GPU: read once per mask for a forward and its backward, and
    # read again after the mask changes in place.
    from internvl3_engine.ops.scatter_visual import op

    reads = []
    real = op.count_visual
    monkeypatch.setattr(op, "count_visual", lambda inclusive: reads.append(1) or real(inclusive))
    mask = torch.tensor([True, False, True, True, False, True])
    text, visual = torch.randn(6, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    out = ie.scatter_visual(text, visual, mask)
    torch.autograd.grad(out.sum(), (text, visual))
    ie.scatter_visual(text, visual, mask)
    assert len(reads) == 1
    mask[1] = True  # five visual tokens now: checked again, and refused
    with pytest.raises(ValueError, match="is_visual marks 5 visual tokens, visual_embeds has 4 rows"):
        ie.scatter_visual(text, visual, mask)
    assert len(reads) == 2
