import pytest
import torch

import internvl3_engine as ie
from internvl3_engine.dispatch import why_unusable
from internvl3_engine.ops.attention import V2PE_ATTENTION, v2pe_attention, v2pe_attention_reference, v2pe_attention_with_lse
from internvl3_engine.ops.attention.blocks import BLOCKS_ENV_VAR, attention_blocks

from helpers import assert_fa_close, backends_for, devices, dtypes_for

CASES = [  # segment lengths, q heads, kv heads, head dim, causal, highest position (None: no rotary)
    ([1, 0, 17, 33], 2, 2, 64, True, None),
    ([70, 5, 0, 31], 6, 3, 64, False, 30_000.0),  # GQA 2, ViT-like, positions near 30k
    ([40, 1, 23], 7, 1, 64, True, 30_000.0),  # GQA 7
    ([3, 45, 16], 3, 1, 128, True, 500.0),  # GQA 3, D = 128
    ([25, 0, 9], 2, 1, 80, False, 100.0),  # head dim padded to a power of two in the kernel
]


def _positions(tokens, high, device):
    # V2PE-like: fractional positions (multiples of 1/256) up to `high`.
    return (torch.randint(0, int(high * 256), (tokens,)).float() / 256).to(device)


def _pack(lengths, q_heads, kv_heads, head_dim, high, device, dtype):
    tokens = sum(lengths)
    q = torch.randn(tokens, q_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype)
    positions = None if high is None else _positions(tokens, high, device)
    return q, k, v, ie.cu_seqlens_from_lengths(lengths, device=device), max(lengths), positions


def _reference_with_grads(q, k, v, cu_seqlens, positions, grad_out, grad_lse, causal, upcast=True):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = v2pe_attention_reference(*leaves, cu_seqlens, positions, causal=causal, upcast=upcast)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse.to(lse.dtype)))
    return out.detach(), lse.detach(), grads


def _run(kind, q, k, v, cu_seqlens, max_seqlen, positions, grad_out, grad_lse, causal, **kwargs):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with ie.backend(kind):
        out, lse = v2pe_attention_with_lse(*leaves, cu_seqlens, max_seqlen, positions, causal=causal, **kwargs)
        grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    return out, lse, grads


def _check_against_float64(kind, dtype, case, device, **kwargs):
    lengths, q_heads, kv_heads, head_dim, causal, high = case
    q, k, v, cu_seqlens, max_seqlen, positions = _pack(lengths, q_heads, kv_heads, head_dim, high, device, dtype)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(q_heads, q.shape[0], device=device)
    out, lse, grads = _run(kind, q, k, v, cu_seqlens, max_seqlen, positions, grad_out, grad_lse, causal, **kwargs)
    gold_out, gold_lse, gold_grads = _reference_with_grads(
        q.double(), k.double(), v.double(), cu_seqlens, positions, grad_out.double(), grad_lse, causal
    )
    # The FlashAttention baseline: the reference with its matmuls in the low precision.
    base_out, base_lse, base_grads = _reference_with_grads(q, k, v, cu_seqlens, positions, grad_out, grad_lse, causal, upcast=False)
    what = f"{kind} {dtype} {kwargs}"
    assert lse.dtype == torch.float32 and lse.shape == (q_heads, q.shape[0])
    assert_fa_close(out, gold_out, base_out, what=f"{what} out")
    assert_fa_close(lse, gold_lse, base_lse.float(), what=f"{what} lse")
    for name, grad, gold, base in zip(("dq", "dk", "dv"), grads, gold_grads, base_grads):
        assert_fa_close(grad, gold, base, factor=3.0, what=f"{what} {name}")


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}:{c[2]}-D{c[3]}-{'causal' if c[4] else 'full'}-{c[5]}")
def test_forward_backward_against_float64(device, case):
    for kind in backends_for(device):
        for dtype in dtypes_for(device, kind):
            _check_against_float64(kind, dtype, case, device)


# Unequal blocks (the diagonal split with BLOCK_M != BLOCK_N in each kernel), by head dim and for all.
UNEQUAL_BLOCKS = "forward@64=32,16,4,1;forward=64,16,4,1;dkdv=16,32,4,1;dq@64=32,16,4,1;dq=16,16,4,1"


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=["D64-full", "D64-causal", "D128-causal"])
def test_block_overrides_against_float64(device, case, monkeypatch):
    if why_unusable("triton", device) is not None:
        pytest.skip(why_unusable("triton", device))
    monkeypatch.setenv(BLOCKS_ENV_VAR, UNEQUAL_BLOCKS)
    assert attention_blocks("forward", 64, torch.float32, device) == (32, 16, 4, 1)
    assert attention_blocks("forward", 128, torch.float32, device) == (64, 16, 4, 1)
    for rotary_mode in ("separate", "prerotate_k"):
        _check_against_float64("triton", torch.float32, case, device, rotary_mode=rotary_mode)


@pytest.mark.parametrize(
    "value, match",
    [
        ("forward=64,32,4", "entries must read"),
        ("forward@96=64,32,4,2", "entries must read"),
        ("backward=64,32,4,2", "kernel must be one of"),
        ("forward=48,16,4,2", "BLOCK_M must be a power of two"),
        ("forward=16,32,4,2", "forward needs BLOCK_M a multiple of BLOCK_N"),
        ("dkdv=32,16,4,2", "dkdv needs BLOCK_N a multiple of BLOCK_M"),
        ("dq=32,16,3,2", "warps must be a power of two"),
        ("dq=32,16,4,0", "stages must be at least 1"),
    ],
)
def test_block_overrides_bad_value(value, match, monkeypatch):
    monkeypatch.setenv(BLOCKS_ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{BLOCKS_ENV_VAR}.*{match}"):
        attention_blocks("forward", 64, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("head_dim", [64, 80], ids=lambda d: f"D{d}")  # 80: halves padded from 40 to 64 in the kernels
def test_rotary_modes_agree(device, head_dim):
    """Both rotary modes against the float64 gold, and against each other."""
    case = ([33, 1, 0, 20], 4, 2, head_dim, True, 30_000.0)
    for kind in backends_for(device):
        for mode in ("prerotate_k", "separate"):
            _check_against_float64(kind, torch.float16, case, device, rotary_mode=mode)
        q, k, v, cu_seqlens, max_seqlen, positions = _pack(*case[:4], case[5], device, torch.float32)
        outs = []
        for mode in ("prerotate_k", "separate"):
            with ie.backend(kind):
                outs.append(v2pe_attention(q, k, v, cu_seqlens, max_seqlen, positions, rotary_mode=mode))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_prerotate_k_returns_the_rotated_q_and_k(device):
    """'prerotate_k' hands its backward q and k as apply_rotary rotates them; 'separate' returns nothing."""
    q, k, v, cu_seqlens, max_seqlen, positions = _pack([21, 1, 0, 9], 4, 2, 64, 30_000.0, device, torch.float32)
    for kind in backends_for(device):
        with ie.backend(kind):
            _, _, q_rotated, k_rotated = torch.ops.internvl3_engine.v2pe_attention(
                q, k, v, cu_seqlens, max_seqlen, positions, 1e6, True, 0.125, "prerotate_k"
            )
            torch.testing.assert_close(q_rotated, ie.apply_rotary(q, positions), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(k_rotated, ie.apply_rotary(k, positions), rtol=1e-6, atol=1e-6)
            for mode, given in (("separate", positions), ("prerotate_k", None)):
                _, _, q_rotated, k_rotated = torch.ops.internvl3_engine.v2pe_attention(
                    q, k, v, cu_seqlens, max_seqlen, given, 1e6, True, 0.125, mode
                )
                assert q_rotated.numel() == 0 and k_rotated.numel() == 0, (kind, mode)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_the_backward_operator_in_either_mode_gives_the_gradients_of_the_unrotated_q_and_k(device):
    """Called directly with positions, the backward operator in 'separate' mode takes the unrotated q and k,
    in 'prerotate_k' mode the forward's rotated ones; both give the public function's gradients."""
    q, k, v, cu_seqlens, max_seqlen, positions = _pack([13, 1, 0, 22], 4, 2, 32, 5_000.0, device, torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = v2pe_attention(*leaves, cu_seqlens, max_seqlen, positions, theta=1e4)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad_out)
    for kind in backends_for(device):
        with ie.backend(kind):
            for mode in ("separate", "prerotate_k"):
                out, lse, q_rotated, k_rotated = torch.ops.internvl3_engine.v2pe_attention(
                    q, k, v, cu_seqlens, max_seqlen, positions, 1e4, True, 32**-0.5, mode)
                given = (q_rotated, k_rotated) if mode == "prerotate_k" else (q, k)
                grads = torch.ops.internvl3_engine.v2pe_attention_backward(
                    grad_out, None, *given, v, out, lse, cu_seqlens, max_seqlen, positions, 1e4, True, 32**-0.5, mode)
                for got, want in zip(grads, expected):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda text: f"{kind} {mode}: {text}")


@pytest.mark.parametrize("device", devices(), ids=str)
def test_positions_equal_apply_rotary_then_attention(device):
    q, k, v, cu_seqlens, max_seqlen, positions = _pack([9, 30, 2], 4, 2, 64, 30_000.0, device, torch.float32)
    for kind in backends_for(device):
        with ie.backend(kind):
            fused = v2pe_attention(q, k, v, cu_seqlens, max_seqlen, positions, theta=1e4)
            rotated = v2pe_attention(
                ie.apply_rotary(q, positions, 1e4), ie.apply_rotary(k, positions, 1e4), v, cu_seqlens, max_seqlen, theta=1e4
            )
        torch.testing.assert_close(fused, rotated, rtol=1e-5, atol=1e-5)


def test_reference_matches_naive_attention():
    """The reference against attention written out for one causal segment: softmax(q k^T / sqrt(D)) v."""
    q, k, v = (torch.randn(5, 2, 16, dtype=torch.float64) for _ in range(3))
    out, lse = v2pe_attention_reference(q, k, v, torch.tensor([0, 5], dtype=torch.int32))
    for h in range(2):
        scores = q[:, h] @ k[:, h].T / 4.0 + torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
        torch.testing.assert_close(out[:, h], torch.softmax(scores, -1) @ v[:, h])
        torch.testing.assert_close(lse[h], torch.logsumexp(scores, -1))


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=str)
def test_empty_pack(device, lengths):
    for kind in backends_for(device):
        q = torch.empty(0, 4, 64, device=device, requires_grad=True)
        k = torch.empty(0, 2, 64, device=device, requires_grad=True)
        v = torch.empty(0, 2, 64, device=device, requires_grad=True)
        cu_seqlens = ie.cu_seqlens_from_lengths(lengths, device=device)
        with ie.backend(kind):
            out, lse = v2pe_attention_with_lse(q, k, v, cu_seqlens, 0, torch.empty(0, device=device))
            out.sum().backward()
        assert out.shape == (0, 4, 64) and lse.shape == (4, 0) and q.grad.shape == q.shape


@pytest.mark.parametrize("device", devices(), ids=str)
def test_larger_max_seqlen_noncontiguous_and_scale(device):
    """max_seqlen above the longest segment only enlarges the grid; strided inputs are made contiguous."""
    q, k, v, cu_seqlens, max_seqlen, positions = _pack([19, 4], 2, 2, 32, 100.0, device, torch.float32)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    gold, _ = v2pe_attention_reference(q, k, v, cu_seqlens, positions, softmax_scale=0.3)
    for kind in backends_for(device):
        with ie.backend(kind):
            out = v2pe_attention(q_strided, k, v, cu_seqlens, max_seqlen + 40, positions, softmax_scale=0.3)
        torch.testing.assert_close(out, gold, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_the_reference():
    assert V2PE_ATTENTION.chosen(torch.device("cpu")) == "torch"


def test_opcheck():
    q, k, v, cu_seqlens, max_seqlen, positions = _pack([5, 0, 3], 4, 2, 16, 50.0, "cpu", torch.float32)
    args = (q, k, v, cu_seqlens, max_seqlen, positions, 1e6, True, 0.25, "prerotate_k")
    torch.library.opcheck(torch.ops.internvl3_engine.v2pe_attention.default, args)
    torch.library.opcheck(torch.ops.internvl3_engine.v2pe_attention.default, args[:5] + (None, 1e6, False, 0.25, "separate"))
    out, lse, q_rotated, k_rotated = torch.ops.internvl3_engine.v2pe_attention(*args)
    backward_args = (torch.randn_like(out), torch.randn_like(lse), q_rotated, k_rotated, v, out, lse,
                     cu_seqlens, max_seqlen, positions, 1e6, True, 0.25, "prerotate_k")
    torch.library.opcheck(torch.ops.internvl3_engine.v2pe_attention_backward.default, backward_args)
    torch.library.opcheck(torch.ops.internvl3_engine.v2pe_attention_backward.default, (backward_args[0], None) + backward_args[2:])


@pytest.mark.parametrize("rotary_mode", ["separate", "prerotate_k"])
def test_torch_compile_fullgraph(rotary_mode):
    def block(x, positions, cu_seqlens, max_seqlen):
        q, k, v = (x * 2).split([32, 16, 16], dim=1)
        out = v2pe_attention(q.unflatten(1, (2, 16)), k[:, None], v[:, None], cu_seqlens, max_seqlen, positions,
                             rotary_mode=rotary_mode)
        return out.flatten(1).sum(-1)

    x = torch.randn(12, 64, requires_grad=True)
    positions = torch.rand(12) * 12
    cu_seqlens = ie.cu_seqlens_from_lengths([7, 5])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    result = compiled(x, positions, cu_seqlens, 7)
    torch.testing.assert_close(result, block(x, positions, cu_seqlens, 7))
    (grad,) = torch.autograd.grad(result.sum(), x)
    (expected,) = torch.autograd.grad(block(x, positions, cu_seqlens, 7).sum(), x)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(q=torch.randn(6, 2, 16, 1)), ValueError, "q must be 3-D"),
        (dict(q=torch.randn(6, 2, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
        (dict(k=torch.randn(6, 1, 16, dtype=torch.float16)), TypeError, "k must have the dtype of q"),
        (dict(v=torch.randn(5, 1, 16)), ValueError, "v must have the 6 tokens of q"),
        (dict(k=torch.randn(6, 1, 18)), ValueError, "k must have the head dim of q"),
        (dict(v=torch.randn(6, 2, 16)), ValueError, "v must have the 1 heads of k"),
        (dict(k=torch.randn(6, 3, 16), v=torch.randn(6, 3, 16)), ValueError, "heads of q \\(2\\) must be a multiple"),
        (dict(q=torch.randn(6, 2, 8), k=torch.randn(6, 1, 8), v=torch.randn(6, 1, 8)), ValueError, "head dim"),
        (dict(q=torch.randn(6, 2, 18)[..., :17], k=torch.randn(6, 1, 17), v=torch.randn(6, 1, 17)), ValueError, "head dim"),
        (dict(cu_seqlens=torch.tensor([0, 6])), TypeError, "cu_seqlens must have dtype int32"),
        (dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens must never decrease"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "cu_seqlens must end at"),
        (dict(cu_seqlens=torch.tensor([1, 6], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
        (dict(max_seqlen=5), ValueError, "max_seqlen must be at least the longest segment \\(6\\)"),
        (dict(max_seqlen=-1), ValueError, "max_seqlen must be non-negative"),
        (dict(max_seqlen=torch.tensor(6)), TypeError, "max_seqlen must be an int"),
        (dict(positions=torch.arange(6)), TypeError, "positions must have dtype float32"),
        (dict(positions=torch.zeros(7)), ValueError, "positions must have 6 rows"),
        (dict(theta=0.0), ValueError, "theta must be positive"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be positive"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(rotary_mode="rope"), ValueError, "rotary_mode must be one of"),
        # 'fused' was removed (measured ~5x slower than 'separate'): refused, naming the modes that remain.
        (dict(rotary_mode="fused"), ValueError, r"rotary_mode must be one of \('prerotate_k', 'separate'\), got 'fused'"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(q=torch.randn(6, 2, 16), k=torch.randn(6, 1, 16), v=torch.randn(6, 1, 16),
                cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=6, positions=torch.zeros(6))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        v2pe_attention(**args)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(4, 1, 16)
    with ie.backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run v2pe_attention"):
        v2pe_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4)


def _gpu_pack(lengths, q_heads, kv_heads, head_dim, dtype):
    return _pack(lengths, q_heads, kv_heads, head_dim, None, torch.device("cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_llm_pack_gqa_7_to_1(dtype):
    """Real size: a 16k-token pack of mixed lengths, D = 128, 14 q / 2 kv heads, causal, V2PE positions."""
    lengths = [4096, 3001, 2048, 1537, 1024, 999, 513, 512, 300, 257, 1, 1, 2095]
    assert sum(lengths) == 16384
    case = (lengths, 14, 2, 128, True, 30_000.0)
    for mode in ("prerotate_k", "separate"):
        _check_against_float64("triton", dtype, case, torch.device("cuda"), rotary_mode=mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_vit_tiles(dtype):
    """Real size: 16 ViT tiles of 1025 tokens, D = 64, 16 heads, bidirectional, no rotary."""
    case = ([1025] * 16, 16, 16, 64, False, None)
    _check_against_float64("triton", dtype, case, torch.device("cuda"))
