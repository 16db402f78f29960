"""What the Triton forward and backward of v2pe_attention share: tile loads and stores, the rotary of q tiles
and the inverse rotary of dq and dk tiles, each program's segment and block, the causal split of a query block's
keys, and the head-dim constants.

q and k are handled as two [BLOCK, D/2] halves (columns d and d + D/2): Qwen2's half-split rotary then
is elementwise on the two tiles, with no register permutation, and the score is the sum of two dots.
The halves are padded to a power of two with masked loads, so any even head dim from 16 to 256 works.
The @triton.jit helpers are inlined into the kernels that call them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rotary.reference import rotary_inv_freq

LOG2E = 1.4426950408889634


@triton.jit
def segment_head_ptr(base_ptr, token0, token_stride, head, head_stride):
    """Pointer to the first token of the segment (token0) in one head of a [T, H, ...] tensor."""
    return base_ptr + token0 * token_stride + head * head_stride


@triton.jit
def tile_ptrs(base_ptr, row_stride, rows, cols):
    """Pointers [rows, cols] into a row-major tile at base_ptr (int64 row offsets)."""
    return base_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]


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
def store_tile(ptrs, rows, row_limit, cols, col_limit, tile):
    """Store a [rows, cols] tile in the pointers' element dtype, where rows < row_limit and cols < col_limit."""
    mask = (rows < row_limit)[:, None] & (cols < col_limit)[None, :]
    tl.store(ptrs, tile.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def rotary_cos_sin(table_ptr, rows, row_limit, cols, HALF: tl.constexpr, CHECK_ROWS: tl.constexpr, PAD_HALF: tl.constexpr):
    """float32 cos and sin [rows, BLOCK_HALF] of the rows' angles, read from the rotary table (see
    rotary_table; zero outside rows < row_limit and cols < HALF, where the rotated tiles are zero too)."""
    ptrs = tile_ptrs(table_ptr, 2 * HALF, rows, cols)
    cos = load_tile(ptrs, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
    sin = load_tile(ptrs + HALF, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
    return cos, sin


@triton.jit
def load_halves(
    base_ptr, row_stride, rows, row_limit, cols, table_ptr,
    HALF: tl.constexpr, CHECK_ROWS: tl.constexpr, PAD_HALF: tl.constexpr, ROTATE: tl.constexpr,
):
    """The two halves [rows, BLOCK_HALF] of one head of q or k, rotated by their positions when ROTATE.
    The rotated halves are rounded to the input dtype, as apply_rotary's output would be."""
    ptrs = tile_ptrs(base_ptr, row_stride, rows, cols)
    x1 = load_tile(ptrs, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
    x2 = load_tile(ptrs + HALF, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
    if ROTATE:
        cos, sin = rotary_cos_sin(table_ptr, rows, row_limit, cols, HALF, CHECK_ROWS, PAD_HALF)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
    return x1, x2


@triton.jit
def store_halves(
    base_ptr, row_stride, rows, row_limit, cols, table_ptr, g1, g2,
    HALF: tl.constexpr, PAD_HALF: tl.constexpr, UNROTATE: tl.constexpr,
):
    """Store the two halves [rows, BLOCK_HALF] of one head, first rotated by -angle when UNROTATE (the adjoint
    of the forward rotation: it turns the gradient of a rotated q or k into that of q or k)."""
    if UNROTATE:
        cos, sin = rotary_cos_sin(table_ptr, rows, row_limit, cols, HALF, True, PAD_HALF)
        r1 = g1 * cos + g2 * sin
        r2 = g2 * cos - g1 * sin
        g1 = r1
        g2 = r2
    ptrs = tile_ptrs(base_ptr, row_stride, rows, cols)
    store_tile(ptrs, rows, row_limit, cols, HALF, g1)
    store_tile(ptrs + HALF, rows, row_limit, cols, HALF, g2)


@triton.jit
def segment_block(cu_seqlens, BLOCK: tl.constexpr):
    """(first row of the program's block within its segment, the segment's first token as int64, the
    segment's length). Program axis 0 numbers the blocks of a segment, axis 1 the segments; a program whose
    block starts at or past the length has nothing to do (the grid is sized for the longest segment)."""
    sequence = tl.program_id(1)
    seq_start = tl.load(cu_seqlens + sequence)
    seqlen = tl.load(cu_seqlens + sequence + 1) - seq_start
    return tl.program_id(0) * BLOCK, seq_start.to(tl.int64), seqlen


@triton.jit
def head_columns(rotary_table, token0, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """(column offsets of a half head, of a whole head, the segment's first row of the rotary table)."""
    return tl.arange(0, BLOCK_HALF), tl.arange(0, BLOCK_D), rotary_table + token0 * (2 * HALF)


@triton.jit
def program_block_halves(
    X, rotary_table, start, token0, seqlen, token_stride, head, head_stride,
    BLOCK: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAD_HALF: tl.constexpr, ROTATE: tl.constexpr,
):
    """The prologue of a program over one block of q or k (the rows from ``start`` of one head of X):
    (rows, half-head and head columns, the segment's first row of the rotary table, the block's two halves,
    rotated when ROTATE)."""
    rows = start + tl.arange(0, BLOCK)
    half_cols, d_cols, table_ptr = head_columns(rotary_table, token0, HALF, BLOCK_HALF, BLOCK_D)
    x1, x2 = load_halves(
        segment_head_ptr(X, token0, token_stride, head, head_stride), token_stride, rows, seqlen, half_cols,
        table_ptr, HALF, True, PAD_HALF, ROTATE,
    )
    return rows, half_cols, d_cols, table_ptr, x1, x2


@triton.jit
def query_block_key_bounds(start_m, seqlen, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, masked_end): the query block at start_m sees every key in [0, full_end) from all its rows,
    and the keys in [full_end, masked_end) only through the mask (causal: the diagonal blocks; otherwise
    the ragged last block)."""
    if CAUSAL:
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        masked_end = seqlen
    return full_end, masked_end


@triton.jit
def visible_keys(rows, keys, seqlen, CAUSAL: tl.constexpr):
    """[rows, keys] mask (broadcastable) of the keys inside the segment that the rows may see."""
    visible = (keys < seqlen)[None, :]
    if CAUSAL:
        visible = visible & (rows[:, None] >= keys[None, :])
    return visible


@triton.jit
def key_block_scores(
    q1, q2, k_base, stride_kt, keys, seqlen, half_cols, table_ptr,
    HALF: tl.constexpr, MASKED: tl.constexpr, PAD_HALF: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(k1, k2, unscaled float32 scores q.k [rows, keys]) of one key block (k read as given: already rotated
    when there are positions), bounds-checked when MASKED."""
    k1, k2 = load_halves(k_base, stride_kt, keys, seqlen, half_cols, table_ptr, HALF, MASKED, PAD_HALF, False)
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
    s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
    return k1, k2, s


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


def rotary_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """float32 [T, D]: row t holds cos(angle[t, :]) then sin(angle[t, :]), with angle[t, i] = positions[t] *
    inv_freq[i] in float32, as apply_rotary computes them. Built once per call (T x D x 4 bytes) and read by
    every head's programs, instead of each program evaluating cos and sin of its own tile: those are long
    library routines (range reduction), and every q head and every block would repeat them."""
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=1)


def positions_table(q: torch.Tensor, positions: torch.Tensor | None, theta: float) -> torch.Tensor:
    """The rotary table of ``positions`` at q's head dim (see rotary_table): what the forward's prologue reads to
    rotate q, and the backward's epilogues to rotate dq and dk back. Without positions it is empty (nothing
    reads it)."""
    if positions is None:
        return q.new_zeros(0, dtype=torch.float32)
    return rotary_table(positions, rotary_inv_freq(q.shape[2], theta, q.device))
