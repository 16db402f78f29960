"""Triton forward of v2pe_attention, in the FlashAttention-2 manner, and the helpers the backward shares.

One program per (query block, segment, q head): it reads its segment's bounds from cu_seqlens, leaves at
once when its block starts past the segment's end (max_seqlen sizes the grid for the longest segment), and
walks the key blocks of its own segment with an online softmax in exp2 (the softmax scale folded with
log2(e)); causal programs stop at the diagonal and mask only the diagonal blocks, and only the ragged last
block is bounds-checked. Accumulators are float32.

q and k are handled as two [BLOCK, D/2] halves (columns d and d + D/2): Qwen2's half-split rotary then
is elementwise on the two tiles, with no register permutation, and the score is the sum of two dots.
The halves are padded to a power of two with masked loads, so any even head dim from 16 to 256 works.
Rotary modes (see op.py): ROTATE_Q rotates the query block once in the prologue; ROTATE_K rotates every
key block as it is loaded (the fully fused mode); without ROTATE_K the kernel reads k as given (already
rotated by a pre-pass, or no rotary at all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...dispatch import triton_interpret
from ..rotary.op import ROTARY
from ..rotary.reference import rotary_inv_freq

LOG2E = 1.4426950408889634


@triton.jit
def load_tile(ptrs, rows, row_limit, cols, col_limit, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [rows, cols] tile, zero outside rows < row_limit and cols < col_limit (each check only when asked)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows < row_limit)[:, None] & (cols < col_limit)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < row_limit)[:, None], other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(cols < col_limit)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def rotary_cos_sin(positions_ptr, rows, row_limit, freq):
    """float32 cos and sin [rows, D/2] of angle = position * inv_freq (rows past row_limit: angle 0)."""
    position = tl.load(positions_ptr + rows, mask=rows < row_limit, other=0.0)
    angle = position[:, None] * freq[None, :]
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def load_halves(
    base_ptr, row_stride, rows, row_limit, cols, positions_ptr, freq,
    HALF: tl.constexpr, CHECK_ROWS: tl.constexpr, PAD_HALF: tl.constexpr, ROTATE: tl.constexpr,
):
    """The two halves [rows, BLOCK_HALF] of one head of q or k, rotated by their positions when ROTATE.
    The rotated halves are rounded to the input dtype, as apply_rotary's output would be."""
    ptrs = base_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    x1 = load_tile(ptrs, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
    x2 = load_tile(ptrs + HALF, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
    if ROTATE:
        cos, sin = rotary_cos_sin(positions_ptr, rows, row_limit, freq)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
    return x1, x2


@triton.jit
def unrotate_store(
    base_ptr, row_stride, rows, row_limit, cols, positions_ptr, freq, g1, g2,
    HALF: tl.constexpr, UNROTATE: tl.constexpr,
):
    """Store a gradient given as two float32 halves, first rotated by -angle when UNROTATE (the adjoint of
    the forward rotation: the gradient of q or k before rotary)."""
    if UNROTATE:
        cos, sin = rotary_cos_sin(positions_ptr, rows, row_limit, freq)
        r1 = g1 * cos + g2 * sin
        r2 = g2 * cos - g1 * sin
        g1 = r1
        g2 = r2
    ptrs = base_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    mask = (rows < row_limit)[:, None] & (cols < HALF)[None, :]
    tl.store(ptrs, g1.to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, g2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_blocks(
    acc, l_i, m_i, q1, q2, rows, seqlen, lo, hi,
    k_base, v_base, stride_kt, stride_vt, positions_ptr, freq, half_cols, d_cols, scale_log2,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, ROTATE_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Key blocks [lo, hi) of the online softmax. MASKED: the diagonal or ragged last blocks (bounds and,
    when CAUSAL, the causal mask); otherwise every key is visible to every row of the block."""
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = load_halves(
            k_base, stride_kt, keys, seqlen, half_cols, positions_ptr, freq, HALF, MASKED, PAD_HALF, ROTATE_K
        )
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
        s = s * scale_log2
        if MASKED:
            visible = (keys < seqlen)[None, :]
            if CAUSAL:
                visible = visible & (rows[:, None] >= keys[None, :])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf: subtract 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + keys.to(tl.int64)[:, None] * stride_vt + d_cols[None, :]
        v = load_tile(v_ptrs, keys, seqlen, d_cols, HEAD_DIM, MASKED, PAD_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, cu_seqlens, positions, inv_freq,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr, LOAD_FREQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens + sequence)
    seqlen = tl.load(cu_seqlens + sequence + 1) - seq_start
    start_m = block_m * BLOCK_M
    if start_m >= seqlen:
        return
    kv_head = head // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    half_cols = tl.arange(0, BLOCK_HALF)
    d_cols = tl.arange(0, BLOCK_D)
    token0 = seq_start.to(tl.int64)
    positions_ptr = positions + token0
    if LOAD_FREQ:
        freq = tl.load(inv_freq + half_cols, mask=half_cols < HALF, other=0.0)
    else:
        freq = tl.zeros([BLOCK_HALF], dtype=tl.float32)

    q_base = Q + token0 * stride_qt + head * stride_qh
    q1, q2 = load_halves(q_base, stride_qt, rows, seqlen, half_cols, positions_ptr, freq, HALF, True, PAD_HALF, ROTATE_Q)
    k_base = K + token0 * stride_kt + kv_head * stride_kh
    v_base = V + token0 * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Keys before the block's first row are visible to all its rows; the diagonal blocks are masked.
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        masked_end = seqlen
    acc, l_i, m_i = _forward_blocks(
        acc, l_i, m_i, q1, q2, rows, seqlen, 0, full_end,
        k_base, v_base, stride_kt, stride_vt, positions_ptr, freq, half_cols, d_cols, scale_log2,
        HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_N, False, CAUSAL, ROTATE_K, DOT_PRECISION,
    )
    acc, l_i, m_i = _forward_blocks(
        acc, l_i, m_i, q1, q2, rows, seqlen, full_end, masked_end,
        k_base, v_base, stride_kt, stride_vt, positions_ptr, freq, half_cols, d_cols, scale_log2,
        HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_N, True, CAUSAL, ROTATE_K, DOT_PRECISION,
    )

    # A row with no visible key (none exists: every row sees itself) would give out = 0 and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> natural log
    row_ok = rows < seqlen
    o_ptrs = Out + token0 * stride_ot + head * stride_oh + rows.to(tl.int64)[:, None] * stride_ot + d_cols[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (d_cols < HEAD_DIM)[None, :])
    tl.store(Lse + head * stride_lse_h + token0 + rows, lse, mask=row_ok)


def attention_blocks(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ('forward', 'dkdv' or 'dq').

    BLOCK_M tiles queries and BLOCK_N keys. The diagonal split needs BLOCK_M a multiple of BLOCK_N in
    'forward' and 'dq', and BLOCK_N a multiple of BLOCK_M in 'dkdv'. Under the interpreter, small blocks
    keep the CPU tests fast. On the GPU: conservative sizes that fit sm_80's shared memory and registers
    (to be tuned on the H100); float32 tiles take twice the memory, so their blocks are halved."""
    if triton_interpret():
        return 16, 16, 1, 1
    padded = triton.next_power_of_2(head_dim)
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    if kernel == "forward":
        if padded <= 64:
            block_m, block_n, warps, stages = 128, 64, 4, 3
        elif padded <= 128:
            block_m, block_n, warps, stages = 128, 64, 8, 3 if hopper else 2
        else:
            block_m, block_n, warps, stages = 64, 32, 4, 2
    elif kernel == "dkdv":
        if padded <= 64:
            block_m, block_n, warps, stages = 32, 128, 4, 2
        elif padded <= 128:
            block_m, block_n, warps, stages = 32, 64, 4, 2
        else:
            block_m, block_n, warps, stages = 16, 32, 4, 1
    elif kernel == "dq":
        if padded <= 64:
            block_m, block_n, warps, stages = 128, 32, 4, 2
        elif padded <= 128:
            block_m, block_n, warps, stages = 64, 32, 4, 2
        else:
            block_m, block_n, warps, stages = 32, 16, 4, 1
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    if dtype == torch.float32:
        block_m, block_n = max(block_m // 2, 16), max(block_n // 2, 16)
    return block_m, block_n, warps, stages


def head_constants(head_dim: int, dtype: torch.dtype) -> dict:
    """The head-dim and precision constexprs shared by every attention kernel."""
    half = head_dim // 2
    block_half = max(triton.next_power_of_2(half), 16)  # tl.dot needs K >= 16
    block_d = max(triton.next_power_of_2(head_dim), 16)
    return dict(
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_D=block_d,
        PAD_HALF=block_half != half,
        PAD_D=block_d != head_dim,
        # float32 inputs: exact float32 products (no TF32), as torch's float32 matmul.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def rotary_plan(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None, theta: float, rotary_mode: str, backward: bool
):
    """(q, k, inv_freq, rotate_q, rotate_k) for the kernels under ``rotary_mode``.

    'fused': the kernels rotate q and k tiles as they load them. 'prerotate_k': k is rotated once by the
    apply_rotary kernel and the kernels load it rotated; the forward rotates q in its prologue, while the
    backward, whose dK/dV kernel re-reads every q block, rotates q once by the pre-pass as well.
    inv_freq is also what the backward's epilogues need to rotate dq and dk back."""
    if positions is None:
        return q, k, q.new_zeros(0, dtype=torch.float32), False, False
    inv_freq = rotary_inv_freq(q.shape[2], theta, q.device)
    if rotary_mode == "fused":
        return q, k, inv_freq, True, True
    rotate = ROTARY.select(k.device)
    k = rotate(k, positions, inv_freq, False)
    if backward:
        return rotate(q, positions, inv_freq, False), k, inv_freq, False, False
    return q, k, inv_freq, True, False


def attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor | None,
    theta: float,
    causal: bool,
    softmax_scale: float,
    rotary_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(q_heads, tokens, dtype=torch.float32, device=q.device)
    num_sequences = cu_seqlens.shape[0] - 1
    if tokens == 0 or num_sequences == 0 or max_seqlen == 0:
        return out, lse
    q_in, k_in, inv_freq, rotate_q, rotate_k = rotary_plan(q, k, positions, theta, rotary_mode, backward=False)
    block_m, block_n, warps, stages = attention_blocks("forward", head_dim, q.dtype, q.device)
    grid = (triton.cdiv(max_seqlen, block_m), num_sequences, q_heads)
    _forward_kernel[grid](
        q_in, k_in, v, out, lse, cu_seqlens, q if positions is None else positions, inv_freq,
        q_in.stride(0), q_in.stride(1), k_in.stride(0), k_in.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        softmax_scale * LOG2E,
        GROUP=q_heads // k.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, ROTATE_Q=rotate_q, ROTATE_K=rotate_k,
        LOAD_FREQ=rotate_q or rotate_k, num_warps=warps, num_stages=stages,
        **head_constants(head_dim, q.dtype),
    )
    return out, lse

