"""Triton backward of v2pe_attention, in the FlashAttention-2 manner, deterministic (no atomics).

1. A preprocess kernel: delta = rowsum(dO * O) (minus the lse gradient when the caller used lse:
   d lse_i / d s_ij = P_ij, so it folds into the same term).
2. dK/dV: one program per (key block, segment, kv head) walks the q heads of its GQA group and their
   query blocks, recomputing P from the saved lse, and accumulates dK and dV in registers.
3. dQ: one program per (query block, segment, q head) walks the key blocks, as the forward does.
Rotary: the kernels read q and k rotated (the forward's q_rotated and k_rotated; in 'separate' mode
apply_rotary rotated them and no positions reach the kernels, unless the operator is called directly with
positions: then q and k are rotated first); with positions the epilogues rotate dq and dk by -angle before
storing them, giving the gradient of the unrotated q and k.
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
    LOG2E, head_constants, key_block_scores, load_halves, load_tile, program_block_halves,
    query_block_key_bounds, positions_table, segment_block, segment_head_ptr, store_halves, store_tile,
    tile_ptrs, visible_keys,
)


@triton.jit
def _preprocess_kernel(
    Out, dOut, grad_lse, Delta, num_tokens,
    stride_ot, stride_oh, stride_dt, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    mask = token_ok[:, None] & (cols < HEAD_DIM)[None, :]
    rows = tokens.to(tl.int64)[:, None]
    o = tl.load(Out + rows * stride_ot + head * stride_oh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dOut + rows * stride_dt + head * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(grad_lse + head.to(tl.int64) * num_tokens + tokens, mask=token_ok, other=0.0)
    tl.store(Delta + head.to(tl.int64) * num_tokens + tokens, delta, mask=token_ok)


@triton.jit
def _dkdv_blocks(
    dk1, dk2, dv, k1, k2, v, keys, seqlen, lo, hi,
    q_base, do_base, lse_base, delta_base, stride_qt, stride_dt, table_ptr, half_cols, d_cols, scale_log2,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Query blocks [lo, hi) of one q head against the program's key block. Rows past the segment load as
    zero with lse = +inf, so their P is 0; MASKED applies the causal mask (the diagonal blocks)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen
        q1, q2 = load_halves(q_base, stride_qt, rows, seqlen, half_cols, table_ptr, HALF, True, PAD_HALF, False)
        do = load_tile(tile_ptrs(do_base, stride_dt, rows, d_cols), rows, seqlen, d_cols, HEAD_DIM, True, PAD_D)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634  # to log2
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION)
        s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=DOT_PRECISION)
        p_t = tl.exp2(s_t * scale_log2 - lse[None, :])
        if MASKED:
            p_t = tl.where(rows[None, :] >= keys[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PRECISION)
        dk2 = tl.dot(ds_t, q2, dk2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, cu_seqlens, rotary_table,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    scale_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UNROTATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n, token0, seqlen = segment_block(cu_seqlens, BLOCK_N)
    if start_n >= seqlen:
        return
    kv_head = tl.program_id(2)
    keys, half_cols, d_cols, table_ptr, k1, k2 = program_block_halves(
        K, rotary_table, start_n, token0, seqlen, stride_kt, kv_head, stride_kh,
        BLOCK_N, HALF, BLOCK_HALF, BLOCK_D, PAD_HALF, False,
    )
    v_ptrs = tile_ptrs(segment_head_ptr(V, token0, stride_vt, kv_head, stride_vh), stride_vt, keys, d_cols)
    v = load_tile(v_ptrs, keys, seqlen, d_cols, HEAD_DIM, True, PAD_D)
    dk1 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Rows before the key block see none of it; rows past it see all of it.
        masked_end = tl.minimum(start_n + BLOCK_N, seqlen)
        full_start = start_n + BLOCK_N
    else:
        masked_end = start_n
        full_start = 0
    for member in range(GROUP):
        head = kv_head * GROUP + member
        q_base = segment_head_ptr(Q, token0, stride_qt, head, stride_qh)
        do_base = segment_head_ptr(dOut, token0, stride_dt, head, stride_dh)
        lse_base = Lse + head * stride_lse_h + token0
        delta_base = Delta + head * stride_lse_h + token0
        dk1, dk2, dv = _dkdv_blocks(
            dk1, dk2, dv, k1, k2, v, keys, seqlen, start_n, masked_end,
            q_base, do_base, lse_base, delta_base, stride_qt, stride_dt, table_ptr, half_cols, d_cols,
            scale_log2, HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_M, True, DOT_PRECISION,
        )
        dk1, dk2, dv = _dkdv_blocks(
            dk1, dk2, dv, k1, k2, v, keys, seqlen, full_start, seqlen,
            q_base, do_base, lse_base, delta_base, stride_qt, stride_dt, table_ptr, half_cols, d_cols,
            scale_log2, HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_M, False, DOT_PRECISION,
        )

    dk_base = segment_head_ptr(dK, token0, stride_dkt, kv_head, stride_dkh)
    store_halves(dk_base, stride_dkt, keys, seqlen, half_cols, table_ptr,
                 dk1 * softmax_scale, dk2 * softmax_scale, HALF, PAD_HALF, UNROTATE)
    dv_ptrs = tile_ptrs(segment_head_ptr(dV, token0, stride_dvt, kv_head, stride_dvh), stride_dvt, keys, d_cols)
    store_tile(dv_ptrs, keys, seqlen, d_cols, HEAD_DIM, dv)


@triton.jit
def _dq_blocks(
    dq1, dq2, q1, q2, do, lse, delta, rows, seqlen, lo, hi,
    k_base, v_base, stride_kt, stride_vt, table_ptr, half_cols, d_cols, scale_log2,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k1, k2, s = key_block_scores(
            q1, q2, k_base, stride_kt, keys, seqlen, half_cols, table_ptr,
            HALF, MASKED, PAD_HALF, DOT_PRECISION,
        )
        v = load_tile(tile_ptrs(v_base, stride_vt, keys, d_cols), keys, seqlen, d_cols, HEAD_DIM, MASKED, PAD_D)
        p = tl.exp2(s * scale_log2 - lse[:, None])
        if MASKED:
            p = tl.where(visible_keys(rows, keys, seqlen, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, cu_seqlens, rotary_table,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
    stride_dqt, stride_dqh, stride_lse_h,
    scale_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UNROTATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m, token0, seqlen = segment_block(cu_seqlens, BLOCK_M)
    if start_m >= seqlen:
        return
    head = tl.program_id(2)
    kv_head = head // GROUP
    rows, half_cols, d_cols, table_ptr, q1, q2 = program_block_halves(
        Q, rotary_table, start_m, token0, seqlen, stride_qt, head, stride_qh,
        BLOCK_M, HALF, BLOCK_HALF, BLOCK_D, PAD_HALF, False,
    )
    row_ok = rows < seqlen
    do_ptrs = tile_ptrs(segment_head_ptr(dOut, token0, stride_dt, head, stride_dh), stride_dt, rows, d_cols)
    do = load_tile(do_ptrs, rows, seqlen, d_cols, HEAD_DIM, True, PAD_D)
    lse = tl.load(Lse + head * stride_lse_h + token0 + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # to log2
    delta = tl.load(Delta + head * stride_lse_h + token0 + rows, mask=row_ok, other=0.0)
    k_base = segment_head_ptr(K, token0, stride_kt, kv_head, stride_kh)
    v_base = segment_head_ptr(V, token0, stride_vt, kv_head, stride_vh)

    dq1 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    full_end, masked_end = query_block_key_bounds(start_m, seqlen, BLOCK_M, BLOCK_N, CAUSAL)
    dq1, dq2 = _dq_blocks(
        dq1, dq2, q1, q2, do, lse, delta, rows, seqlen, 0, full_end,
        k_base, v_base, stride_kt, stride_vt, table_ptr, half_cols, d_cols, scale_log2,
        HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_N, False, CAUSAL, DOT_PRECISION,
    )
    dq1, dq2 = _dq_blocks(
        dq1, dq2, q1, q2, do, lse, delta, rows, seqlen, full_end, masked_end,
        k_base, v_base, stride_kt, stride_vt, table_ptr, half_cols, d_cols, scale_log2,
        HEAD_DIM, HALF, PAD_HALF, PAD_D, BLOCK_N, True, CAUSAL, DOT_PRECISION,
    )
    dq_base = segment_head_ptr(dQ, token0, stride_dqt, head, stride_dqh)
    store_halves(dq_base, stride_dqt, rows, seqlen, half_cols, table_ptr,
                 dq1 * softmax_scale, dq2 * softmax_scale, HALF, PAD_HALF, UNROTATE)


def attention_backward_triton(
    grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode
):
    """The 'triton' backend of the v2pe_attention_backward operator: its arguments, (dq, dk, dv)."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    num_sequences = cu_seqlens.shape[0] - 1
    if tokens == 0 or num_sequences == 0 or max_seqlen == 0:
        return dq, dk, dv
    if positions is not None and not keeps_rotated(positions, rotary_mode):
        # q and k unrotated ('separate' mode with positions, a direct call of the operator): rotated here as
        # the forward rotated them, so that the kernels read what it attended.
        rotate, inv_freq = ROTARY.select(q.device), rotary_inv_freq(head_dim, theta, q.device)
        q, k = rotate(q, positions, inv_freq, False), rotate(k, positions, inv_freq, False)
    constants = head_constants(head_dim, q.dtype)
    # The kernels index lse, delta and the lse gradient as contiguous [Hq, T].
    lse = lse.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()

    delta = torch.empty(q_heads, tokens, dtype=torch.float32, device=q.device)
    block_t = 16
    _preprocess_kernel[(triton.cdiv(tokens, block_t), q_heads)](
        out, grad_out, grad_out if grad_lse is None else grad_lse, delta, tokens,
        out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=constants["BLOCK_D"], BLOCK_T=block_t, HAS_GRAD_LSE=grad_lse is not None,
    )

    table = positions_table(q, positions, theta)
    flags = dict(GROUP=q_heads // kv_heads, CAUSAL=causal, UNROTATE=positions is not None, **constants)
    scale_log2 = softmax_scale * LOG2E

    block_m, block_n, warps, stages = attention_blocks("dkdv", head_dim, q.dtype, q.device)
    _dkdv_kernel[(triton.cdiv(max_seqlen, block_n), num_sequences, kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        scale_log2, softmax_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
    )
    block_m, block_n, warps, stages = attention_blocks("dq", head_dim, q.dtype, q.device)
    _dq_kernel[(triton.cdiv(max_seqlen, block_m), num_sequences, q_heads)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        scale_log2, softmax_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
    )
    return dq, dk, dv
