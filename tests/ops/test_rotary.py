import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.ops.rotary import rotary_inv_freq, rotary_reference

from helpers import assert_fa_close, backends_for, devices, dtypes_for

CASES = [  # tokens, heads, head_dim, rotary_dim, max position
    (1, 1, 64, None, 10.0),
    (37, 3, 64, None, 500.0),
    (50, 2, 128, 64, 30_000.0),  # partial rotary, large positions
    (19, 5, 10, 6, 100.0),  # head dim and pair count not powers of two
]


def _positions(tokens, high, device):
    # V2PE-like: integer and fractional positions (multiples of 1/256) up to `high`.
    return (torch.randint(0, int(high * 256), (tokens,)).float() / 256).to(device)


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("tokens,heads,head_dim,rotary_dim,high", CASES)
def test_forward_backward_against_float64(device, tokens, heads, head_dim, rotary_dim, high):
    positions = _positions(tokens, high, device)
    inv_freq = rotary_inv_freq(rotary_dim or head_dim, 1e6, device)
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            x = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            with ie.backend(kind):  # the backward too runs on the backend under test
                out = ie.apply_rotary(x, positions, rotary_dim=rotary_dim)
                (dx,) = torch.autograd.grad(out, x, grad)
            gold = rotary_reference(x.detach().double(), positions, inv_freq)
            gold_dx = rotary_reference(grad.double(), positions, inv_freq, inverse=True)
            baseline = rotary_reference(x.detach(), positions, inv_freq)
            baseline_dx = rotary_reference(grad, positions, inv_freq, inverse=True)
            assert_fa_close(out, gold, baseline, what=f"{kind} {dtype} out")
            assert_fa_close(dx, gold_dx, baseline_dx, factor=3.0, what=f"{kind} {dtype} dx")


def test_reference_matches_qwen2_formula():
    """Against the paper's formula written out: q' = [q1 cos - q2 sin, q2 cos + q1 sin], theta^(-2i/D)."""
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    positions = torch.tensor([0.0, 1.0, 2.5, 1000.25])
    out = ie.apply_rotary(x, positions, theta=10_000.0)
    for t in range(4):
        for i in range(4):
            angle = torch.tensor(positions[t].item() * (10_000.0 ** (-2 * i / 8)), dtype=torch.float32).double()
            x1, x2 = x[t, :, i], x[t, :, i + 4]
            # float32 angles: inv_freq and the product are each rounded to float32 once.
            torch.testing.assert_close(out[t, :, i], x1 * angle.cos() - x2 * angle.sin(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out[t, :, i + 4], x2 * angle.cos() + x1 * angle.sin(), rtol=1e-6, atol=1e-6)


def test_integer_positions_match_table_lookup():
    """With integer positions the op equals the usual cos/sin table indexed by position."""
    x = torch.randn(16, 2, 32, dtype=torch.float64)
    out = ie.apply_rotary(x, torch.arange(16, dtype=torch.float32))
    inv_freq = rotary_inv_freq(32, 1e6, torch.device("cpu"))
    angles = torch.outer(torch.arange(16, dtype=torch.float32), inv_freq).double()
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    expected = torch.cat([x[..., :16] * cos - x[..., 16:] * sin, x[..., 16:] * cos + x[..., :16] * sin], -1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_empty(device):
    for kind in backends_for(device):
        with ie.backend(kind):
            out = ie.apply_rotary(torch.empty(0, 2, 8, device=device), torch.empty(0, device=device))
        assert out.shape == (0, 2, 8)


def test_noncontiguous_input_is_handled():
    x = torch.randn(8, 16, 3).transpose(1, 2)  # [8, 3, 16], not contiguous
    positions = torch.arange(8, dtype=torch.float32)
    torch.testing.assert_close(ie.apply_rotary(x, positions), ie.apply_rotary(x.contiguous(), positions))


def test_opcheck():
    x = torch.randn(6, 2, 8)
    positions = torch.rand(6) * 50
    torch.library.opcheck(torch.ops.internvl3_engine.apply_rotary.default, (x, positions, 1e6, 8))
    torch.library.opcheck(torch.ops.internvl3_engine.apply_rotary_backward.default, (x, positions, 1e6, 6))


def test_torch_compile_fullgraph():
    def block(x, positions):
        return ie.apply_rotary(x * 2, positions).sum(-1)

    x = torch.randn(9, 2, 16)
    positions = torch.rand(9) * 9
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, positions), block(x, positions))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(4, 8)), ValueError, "x must be 3-D"),
        (dict(x=torch.randint(0, 3, (4, 2, 8))), TypeError, "x must have dtype"),
        (dict(positions=torch.arange(4)), TypeError, "positions must have dtype float32"),
        (dict(positions=torch.zeros(5)), ValueError, "positions must have 4 rows"),
        (dict(positions=torch.zeros(4, 1)), ValueError, "positions must be 1-D"),
        (dict(rotary_dim=3), ValueError, "rotary_dim must be even"),
        (dict(rotary_dim=10), ValueError, "rotary_dim must be even"),
        (dict(rotary_dim=4.0), TypeError, "rotary_dim must be an int"),
        (dict(theta=-1.0), ValueError, "theta must be positive"),
        (dict(theta="big"), TypeError, "theta must be a float"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(4, 2, 8), positions=torch.zeros(4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ie.apply_rotary(**args)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ie.backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run apply_rotary"):
        ie.apply_rotary(torch.randn(2, 1, 4), torch.zeros(2))


@pytest.mark.gpu
def test_gpu_bfloat16_large_pack():
    device = torch.device("cuda")
    x = torch.randn(16384, 14, 128, device=device, dtype=torch.bfloat16)
    positions = _positions(16384, 30_000.0, device)
    inv_freq = rotary_inv_freq(128, 1e6, device)
    gold = rotary_reference(x.double(), positions, inv_freq)
    baseline = rotary_reference(x, positions, inv_freq)
    for kind in ("triton", "cuda"):
        with ie.backend(kind):
            assert_fa_close(ie.apply_rotary(x, positions), gold, baseline, what=kind)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_unaligned_input_agrees(device):
    """A contiguous x whose data does not start on a 16-byte boundary: the compiled kernels move single
    elements instead of 16-byte vectors, with the same result."""
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            storage = torch.randn(1 + 7 * 2 * 64, device=device, dtype=dtype)
            x = storage[1:].view(7, 2, 64)  # offset by one element
            positions = _positions(7, 1000.0, device)
            with ie.backend(kind):
                out, aligned = ie.apply_rotary(x, positions), ie.apply_rotary(x.clone(), positions)
            torch.testing.assert_close(out, aligned, rtol=0, atol=0, msg=lambda m: f"{kind} {dtype}: {m}")
