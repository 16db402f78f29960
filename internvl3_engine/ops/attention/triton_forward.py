"""Triton forward of v2pe_attention, in the FlashAttention-2 manner.

One program per (query block, segment, q head): it reads its segment's bounds from cu_seqlens, leaves at
once when its block starts past the segment's end (max_seqlen sizes the grid for the longest segment), and
walks the key blocks of its own segment with an online softmax in exp2 (the softmax scale folded with
log2(e)); causal programs stop at the diagonal and mask only the diagonal blocks, and only the ragged last
block is bounds-checked. Accumulators are float32. q and k are loaded as two halves (see triton_common).
Rotary (with positions, see op.py): ROTATE_Q rotates the query block once in the prologue, through QRotated
(see the kernel); k is read as given, rotated once beforehand by the apply_rotary kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rotary.op import ROTARY
from ..rotary.reference import rotary_inv_freq
from .blocks import attention_blocks
from .op import keeps_rotated
from .triton_common import (
    LOG2E, head_constants, key_block_scores, load_halves, load_tile, positions_table, program_block_halves,
    query_block_key_bounds, segment_block, segment_head_ptr, store_halves, store_tile, tile_ptrs, visible_keys,
)


@triton.jit
def _forward_blocks(
    acc, l_i, m_i, q1, q2, rows, seqlen, lo, hi,
    k_base, v_base, stride_kt, stride_vt, table_ptr, half_cols, d_cols, scale_log2,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key blocks [lo, hi) of the online softmax. MASKED: the diagonal or ragged last blocks (bounds and,
    when CAUSAL, the causal mask); otherwise every key is visible to every row of the block."""
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        _, _, s = key_block_scores(
            q1, q2, k_base, stride_kt, keys, seqlen, half_cols, table_ptr,
            HALF, MASKED, PAD_HALF, DOT_PRECISION,
        )
        s = s * scale_log2
        if MASKED:
            s = tl.where(visible_keys(rows, keys, seqlen, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf: subtract 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(tile_ptrs(v_base, stride_vt, keys, d_cols), keys, seqlen, d_cols, HEAD_DIM, MASKED, PAD_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, QRotated, cu_seqlens, rotary_table,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ROTATE_Q: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m, token0, seqlen = segment_block(cu_seqlens, BLOCK_M)
    if start_m >= seqlen:
        return
    head = tl.program_id(2)
    kv_head = head // GROUP
    rows, half_cols, d_cols, table_ptr, q1, q2 = program_block_halves(
        Q, rotary_table, start_m, token0, seqlen, stride_qt, head, stride_qh,
        BLOCK_M, HALF, BLOCK_HALF, BLOCK_D, PAD_HALF, ROTATE_Q,
    )
    if ROTATE_Q:
        # The rotated block is stored to QRotated (q's layout: the q_rotated the backward reads instead of
        # rotating q again, or Out where no q_rotated is kept: this program overwrites its tile at the end)
        # and loaded back: a q loaded from memory is a shared-memory operand of Hopper's MMA (wgmma), while a
        # q computed in registers would stay a register operand through the whole key loop (more registers
        # per thread, and slower). The reload hits L2.
        q_rotated_base = segment_head_ptr(QRotated, token0, stride_qt, head, stride_qh)
        store_halves(q_rotated_base, stride_qt, rows, seqlen, half_cols, table_ptr, q1, q2, HALF, PAD_HALF, False)
        tl.debug_barrier()
        q1, q2 = load_halves(q_rotated_base, stride_qt, rows, seqlen, half_cols, table_ptr, HALF, True, PAD_HALF, False)
    k_base = segment_head_ptr(K, token0, stride_kt, kv_head, stride_kh)
    v_base = segment_head_ptr(V, token0, stride_vt, kv_head, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, masked_end = query_block_key_bounds(start_m, seqlen, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _forward_blocks(
        acc, l_i, m_i, q1, q2, rows, seqlen, 0, full_end,
        k_base, v_base, stride_kt, stride_vt, table_ptr, half_cols, d_cols, scale_log2,
        HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_N, False, CAUSAL, DOT_PRECISION,
    )
    acc, l_i, m_i = _forward_blocks(
        acc, l_i, m_i, q1, q2, rows, seqlen, full_end, masked_end,
        k_base, v_base, stride_kt, stride_vt, table_ptr, half_cols, d_cols, scale_log2,
        HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_N, True, CAUSAL, DOT_PRECISION,
    )

    # A row with no visible key (none exists: every row sees itself) would give out = 0 and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> natural log
    o_ptrs = tile_ptrs(segment_head_ptr(Out, token0, stride_ot, head, stride_oh), stride_ot, rows, d_cols)
    store_tile(o_ptrs, rows, seqlen, d_cols, HEAD_DIM, out)
    tl.store(Lse + head * stride_lse_h + token0 + rows, lse, mask=rows < seqlen)


def attention_forward_triton(q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode):
    """The 'triton' backend of the v2pe_attention operator: its arguments, (out, lse, q_rotated, k_rotated)."""
    tokens, q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(q_heads, tokens, dtype=torch.float32, device=q.device)
    table = positions_table(q, positions, theta)
    rotate_q = positions is not None
    # With positions, k is rotated once here by the apply_rotary kernel; the kernel rotates q in its prologue.
    k_in = ROTARY.select(k.device)(k, positions, rotary_inv_freq(head_dim, theta, k.device), False) if rotate_q else k
    keep = keeps_rotated(positions, rotary_mode)
    q_rotated = torch.empty_like(q) if keep else q.new_empty(0)
    k_rotated = k_in if keep else k.new_empty(0)
    num_sequences = cu_seqlens.shape[0] - 1
    if tokens == 0 or num_sequences == 0 or max_seqlen == 0:
        return out, lse, q_rotated, k_rotated
    block_m, block_n, warps, stages = attention_blocks("forward", head_dim, q.dtype, q.device)
    grid = (triton.cdiv(max_seqlen, block_m), num_sequences, q_heads)
    _forward_kernel[grid](
        q, k_in, v, out, lse, q_rotated if keep else out, cu_seqlens, table,
        q.stride(0), q.stride(1), k_in.stride(0), k_in.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        softmax_scale * LOG2E,
        GROUP=q_heads // k.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, ROTATE_Q=rotate_q,
        num_warps=warps, num_stages=stages,
        **head_constants(head_dim, q.dtype),
    )
    return out, lse, q_rotated, k_rotated

