import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.ops.pixel_unshuffle import (
    pixel_unshuffle_backward_reference,
    pixel_unshuffle_layernorm_backward_reference,
    pixel_unshuffle_layernorm_reference,
    pixel_unshuffle_reference,
)

from helpers import assert_fa_close, backends_for, devices, dtypes_for

# N, h, w, C, r. The Triton interpreter is slow: it gets the small cases only.
SMALL_CASES = [
    (1, 2, 2, 1, 2),  # tiny
    (2, 4, 6, 5, 2),  # odd C, h != w
    (2, 8, 8, 24, 2),  # realistic-small
    (1, 6, 9, 7, 3),  # r = 3, odd C
    (0, 4, 4, 8, 2),  # empty
]
LARGE_CASES = [(3, 32, 32, 16, 2), (2, 16, 12, 33, 2)]


def _cases(kind):
    return SMALL_CASES if kind == "triton" else SMALL_CASES + LARGE_CASES


def _all_dtypes(device, kind):
    extra = [] if (device.type == "cpu" and kind == "triton") else [torch.float64]
    return dtypes_for(device, kind) + extra


def _closed_form(x, r):
    """out[n, i, j, k] = x[n, r*i + k // (r*C), r*j + (k % (r*C)) // C, k % C], by explicit indexing."""
    n, h, w, c = x.shape
    k = torch.arange(r * r * c)
    i = torch.arange(h // r)[:, None, None]
    j = torch.arange(w // r)[None, :, None]
    return x[:, r * i + k // (r * c), r * j + (k % (r * c)) // c, k % c]


def test_reference_hand_built_examples():
    # r=2, C=1: x[a, b] = 4a + b on a 4x4 grid.
    x = torch.arange(16.0).view(1, 4, 4, 1)
    expected = torch.tensor([[[0, 1, 4, 5], [2, 3, 6, 7]], [[8, 9, 12, 13], [10, 11, 14, 15]]], dtype=torch.float32)
    assert torch.equal(pixel_unshuffle_reference(x, 2), expected[None])
    # r=2, C=2, h=2, w=4: x[a, b, c] = 8a + 2b + c.
    x = torch.arange(16.0).view(1, 2, 4, 2)
    expected = torch.tensor([[[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]], dtype=torch.float32)
    assert torch.equal(pixel_unshuffle_reference(x, 2), expected[None])
    # r=2, C=1, h=4, w=2: x[a, b] = 2a + b.
    x = torch.arange(8.0).view(1, 4, 2, 1)
    expected = torch.tensor([[[0, 1, 2, 3]], [[4, 5, 6, 7]]], dtype=torch.float32)
    assert torch.equal(pixel_unshuffle_reference(x, 2), expected[None])


@pytest.mark.parametrize("r", [1, 2, 3])
def test_reference_matches_closed_form(r):
    x = torch.randn(2, 3 * r, 2 * r, 5)
    assert torch.equal(pixel_unshuffle_reference(x, r), _closed_form(x, r))
    grad = torch.randn(2, 3, 2, r * r * 5)
    assert torch.equal(pixel_unshuffle_backward_reference(pixel_unshuffle_reference(x, r), r), x)
    assert torch.equal(pixel_unshuffle_reference(pixel_unshuffle_backward_reference(grad, r), r), grad)


def test_differs_from_torch_pixel_unshuffle():
    """Same values at each position, but not torch.nn.functional.pixel_unshuffle's channel order."""
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).view(2, 4, 4, 3)
    ours = ie.pixel_unshuffle(x)
    theirs = torch.nn.functional.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert ours.shape == theirs.shape
    assert not torch.equal(ours, theirs)
    assert torch.equal(ours.sort(dim=-1).values, theirs.sort(dim=-1).values)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_pixel_unshuffle_exact(device):
    for kind in backends_for(device):
        for n, h, w, c, r in _cases(kind):
            for dtype in _all_dtypes(device, kind):
                x = torch.randn(n, h, w, c, device=device, dtype=dtype, requires_grad=True)
                with ie.backend(kind):
                    out = ie.pixel_unshuffle(x, 1 / r)
                    grad = torch.randn_like(out)
                    (dx,) = torch.autograd.grad(out, x, grad)
                what = f"{kind} {dtype} {(n, h, w, c, r)}"
                assert torch.equal(out, pixel_unshuffle_reference(x.detach(), r)), what
                assert torch.equal(dx, pixel_unshuffle_backward_reference(grad, r)), what


def _params(width, dtype, device):
    weight = (1 + 0.5 * torch.randn(width, device=device)).to(dtype).requires_grad_()
    bias = (0.5 * torch.randn(width, device=device)).to(dtype).requires_grad_()
    return weight, bias


def _check_layernorm(kind, x, weight, bias, r, what):
    x = x.detach().requires_grad_()
    with ie.backend(kind):
        out = ie.pixel_unshuffle_layernorm(x, weight, bias, scale_factor=1 / r)
        grad = torch.randn_like(out)
        dx, dweight, dbias = torch.autograd.grad(out, (x, weight, bias), grad)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    gold, mean, rstd = pixel_unshuffle_layernorm_reference(x.double(), weight.double(), bias.double(), 1e-5, r)
    gold_grads = pixel_unshuffle_layernorm_backward_reference(grad.double(), x.double(), weight.double(), mean, rstd, r)
    base, mean, rstd = pixel_unshuffle_layernorm_reference(x, weight, bias, 1e-5, r)
    base_grads = pixel_unshuffle_layernorm_backward_reference(grad, x, weight, mean, rstd, r)
    assert_fa_close(out, gold, base, what=f"{what} out")
    for name, actual, expected, baseline in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), gold_grads, base_grads):
        assert_fa_close(actual, expected, baseline, factor=3.0, what=f"{what} {name}")


@pytest.mark.parametrize("device", devices(), ids=str)
def test_layernorm_forward_backward_against_float64(device):
    for kind in backends_for(device):
        for n, h, w, c, r in _cases(kind):
            for dtype in _all_dtypes(device, kind):
                x = 2 * torch.randn(n, h, w, c, device=device, dtype=dtype) + 1
                weight, bias = _params(r * r * c, dtype, device)
                _check_layernorm(kind, x, weight, bias, r, f"{kind} {dtype} {(n, h, w, c, r)}")


@pytest.mark.parametrize("device", devices(), ids=str)
def test_layernorm_float32_params_low_precision_activations(device):
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            if dtype == torch.float32:
                continue
            x = torch.randn(2, 8, 8, 24, device=device, dtype=dtype)
            weight, bias = _params(96, torch.float32, device)
            _check_layernorm(kind, x, weight, bias, 2, f"{kind} {dtype} x, float32 params")


@pytest.mark.parametrize("device", devices(), ids=str)
def test_layernorm_unaligned_float32_params(device):
    """weight and bias as views at odd offsets of one float32 buffer: the compiled kernels read them as
    vectors, which an unaligned view must not be read as."""
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            x = torch.randn(2, 8, 8, 24, device=device, dtype=dtype)
            buffer = (1 + 0.5 * torch.randn(2 * 96 + 3, device=device)).requires_grad_()
            weight, bias = buffer[1:97], buffer[98:194]
            _check_layernorm(kind, x, weight, bias, 2, f"{kind} {dtype} x, unaligned float32 params")


@pytest.mark.parametrize("device", devices(), ids=str)
def test_layernorm_matches_torch_layer_norm(device):
    """The reference equals torch's LayerNorm applied to the unshuffled rows (the projector's first layer)."""
    x = torch.randn(2, 8, 8, 6, device=device, dtype=torch.float64)
    weight, bias = _params(24, torch.float64, device)
    expected = torch.nn.functional.layer_norm(pixel_unshuffle_reference(x, 2).reshape(2, 16, 24), (24,), weight, bias, 1e-5)
    for kind in backends_for(device):
        with ie.backend(kind):
            torch.testing.assert_close(ie.pixel_unshuffle_layernorm(x, weight, bias), expected)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_layernorm_backward_deterministic(device):
    x = torch.randn(2, 8, 8, 24, device=device, requires_grad=True)
    weight, bias = _params(96, torch.float32, device)
    for kind in backends_for(device):
        with ie.backend(kind):
            out = ie.pixel_unshuffle_layernorm(x, weight, bias)
            grad = torch.randn_like(out)
            first = torch.autograd.grad(out, (x, weight, bias), grad, retain_graph=True)
            second = torch.autograd.grad(out, (x, weight, bias), grad)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), kind


def test_noncontiguous_input_is_handled():
    x = torch.randn(2, 8, 6, 4).transpose(1, 2)  # [2, 6, 8, 4], not contiguous
    weight, bias = _params(16, torch.float32, torch.device("cpu"))
    assert torch.equal(ie.pixel_unshuffle(x), ie.pixel_unshuffle(x.contiguous()))
    torch.testing.assert_close(ie.pixel_unshuffle_layernorm(x, weight, bias), ie.pixel_unshuffle_layernorm(x.contiguous(), weight, bias))


def test_scale_factor_one_is_identity():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(ie.pixel_unshuffle(x, 1.0), x)


def test_opcheck():
    # The operators take no gradients (autograd lives in the public functions; ops/library.py says why).
    x = torch.randn(2, 4, 6, 3)
    weight, bias = (param.detach() for param in _params(12, torch.float32, torch.device("cpu")))
    ops = torch.ops.internvl3_engine
    torch.library.opcheck(ops.pixel_unshuffle.default, (x, 2))
    torch.library.opcheck(ops.pixel_unshuffle_backward.default, (torch.randn(2, 2, 3, 12), 2))
    torch.library.opcheck(ops.pixel_unshuffle_layernorm.default, (x, weight, bias, 1e-5, 2))
    _, mean, rstd = ops.pixel_unshuffle_layernorm(x, weight, bias, 1e-5, 2)
    grad = torch.randn(2, 6, 12)
    torch.library.opcheck(ops.pixel_unshuffle_layernorm_backward.default, (grad, x, weight, mean, rstd, 2))


def test_torch_compile_fullgraph():
    def projector_input(x, weight, bias):
        return ie.pixel_unshuffle_layernorm(x * 2, weight, bias).sum() + ie.pixel_unshuffle(x).square().sum()

    x = torch.randn(2, 4, 4, 6, requires_grad=True)
    weight, bias = _params(24, torch.float32, torch.device("cpu"))
    compiled = torch.compile(projector_input, fullgraph=True, backend="aot_eager")
    expected = projector_input(x, weight, bias)
    actual = compiled(x, weight, bias)
    torch.testing.assert_close(actual, expected)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias))
    actual_grads = torch.autograd.grad(actual, (x, weight, bias))
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(4, 4, 8)), ValueError, "x must be 4-D"),
        (dict(x=torch.randn(1, 3, 4, 8)), ValueError, "x's h and w must be divisible"),
        (dict(x=torch.randn(1, 4, 5, 8)), ValueError, "x's h and w must be divisible"),
        (dict(x=torch.randint(0, 3, (1, 4, 4, 8))), TypeError, "x must have dtype"),
        (dict(x="x"), TypeError, "x must be a torch.Tensor"),
        (dict(weight=torch.ones(31)), ValueError, "weight must have r\\*r\\*C = 32 entries"),
        (dict(bias=torch.ones(2, 16)), ValueError, "bias must be 1-D"),
        (dict(bias=torch.ones(32, dtype=torch.float64)), TypeError, "bias must have weight's dtype"),
        (dict(weight=torch.ones(32, dtype=torch.int64)), TypeError, "weight must have dtype"),
        (dict(weight=torch.ones(32, device="meta")), ValueError, "weight must be on cpu"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
        (dict(eps=-1e-5), ValueError, "eps must be positive"),
        (dict(eps="small"), TypeError, "eps must be a float"),
        (dict(scale_factor=0.3), ValueError, "scale_factor must be 1/r"),
        (dict(scale_factor=2.0), ValueError, "scale_factor must be 1/r"),
        (dict(scale_factor=-0.5), ValueError, "scale_factor must be positive"),
        (dict(scale_factor="half"), TypeError, "scale_factor must be a float"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(1, 4, 4, 8), weight=torch.ones(32), bias=torch.zeros(32))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ie.pixel_unshuffle_layernorm(**args)
    if not {"weight", "bias", "eps"} & set(kwargs):
        with pytest.raises(error, match=match):
            ie.pixel_unshuffle(args["x"], **({"scale_factor": args["scale_factor"]} if "scale_factor" in args else {}))


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [1024, 3200], ids=["InternViT-300M", "InternViT-6B"])
def test_gpu_bfloat16_real_size(channels):
    """8 tiles of InternViT features (32x32 patches) in bfloat16, float32 LayerNorm parameters: rows of 4096
    and 12800 elements (the compiled kernels launch each with a different block shape)."""
    device = torch.device("cuda")
    x = torch.randn(8, 32, 32, channels, device=device, dtype=torch.bfloat16)
    weight, bias = _params(4 * channels, torch.float32, device)
    reference_rows = pixel_unshuffle_reference(x, 2)
    grad_rows = torch.randn_like(reference_rows)
    for kind in ("triton", "cuda"):
        with ie.backend(kind):
            xg = x.clone().requires_grad_()
            out = ie.pixel_unshuffle(xg)
            (dx,) = torch.autograd.grad(out, xg, grad_rows)
        assert torch.equal(out, reference_rows), kind
        assert torch.equal(dx, pixel_unshuffle_backward_reference(grad_rows, 2)), kind
        _check_layernorm(kind, x, weight, bias, 2, f"{kind} bfloat16 8x32x32x{channels}")
