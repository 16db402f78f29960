"""Triton kernels of pixel_unshuffle and pixel_unshuffle_layernorm.

Output row (n, i, j) of pixel_unshuffle is r contiguous chunks of r*C elements of x (chunk q is
x[n, r*i + q, r*j : r*j + r, :]), so a program handles one row as a [r, r*C] tile whose loads and stores
are contiguous along the chunk: coalesced and vectorised on both sides. The backward scatters with the
same offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import stats_dtype


@triton.jit
def _row_source_base(row, h, w, channels, out_h, out_w, R: tl.constexpr):
    """Offset in x of x[n, R*i, R*j, 0] for output row = (n*out_h + i)*out_w + j (int64)."""
    row = tl.cast(row, tl.int64)
    j = row % out_w
    rest = row // out_w
    i = rest % out_h
    n = rest // out_h
    return ((n * h + R * i) * w + R * j) * channels


@triton.jit
def _permute_kernel(
    x_ptr, rows_ptr, h, w, channels, out_h, out_w,
    R: tl.constexpr, TO_X: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    chunk = R * channels
    mask = m < chunk
    base = _row_source_base(row, h, w, channels, out_h, out_w, R)
    row_base = row.to(tl.int64) * (R * chunk)
    for q in tl.static_range(R):
        x_offsets = base + q * w * channels + m
        row_offsets = row_base + q * chunk + m
        if TO_X:
            tl.store(x_ptr + x_offsets, tl.load(rows_ptr + row_offsets, mask=mask), mask=mask)
        else:
            tl.store(rows_ptr + row_offsets, tl.load(x_ptr + x_offsets, mask=mask), mask=mask)


def _permute(x: torch.Tensor, rows: torch.Tensor, factor: int, to_x: bool) -> None:
    n, h, w, channels = x.shape
    if x.numel() == 0:
        return
    chunk = factor * channels
    block = min(triton.next_power_of_2(chunk), 4096)
    num_rows = n * (h // factor) * (w // factor)
    _permute_kernel[(num_rows, triton.cdiv(chunk, block))](
        x, rows, h, w, channels, h // factor, w // factor,
        R=factor, TO_X=to_x, BLOCK=block, num_warps=4 if block <= 2048 else 8,
    )


def pixel_unshuffle_triton(x: torch.Tensor, factor: int) -> torch.Tensor:
    n, h, w, channels = x.shape
    out = torch.empty(n, h // factor, w // factor, factor * factor * channels, device=x.device, dtype=x.dtype)
    _permute(x, out, factor, to_x=False)
    return out


def pixel_unshuffle_backward_triton(grad: torch.Tensor, factor: int) -> torch.Tensor:
    n, out_h, out_w, width = grad.shape
    dx = torch.empty(n, out_h * factor, out_w * factor, width // (factor * factor), device=grad.device, dtype=grad.dtype)
    _permute(dx, grad, factor, to_x=True)
    return dx


@triton.jit
def _row_tile(h, w, channels, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """A row as a [BLOCK_Q, BLOCK_M] tile: offsets in x relative to the row's base, offsets within the row, mask."""
    q = tl.arange(0, BLOCK_Q)[:, None]
    m = tl.arange(0, BLOCK_M)[None, :]
    chunk = R * channels
    return q * w * channels + m, q * chunk + m, (q < R) & (m < chunk)


@triton.jit
def _layernorm_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr,
    h, w, channels, out_h, out_w, eps,
    R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
):
    row = tl.program_id(0)
    width = R * R * channels
    x_offsets, k, mask = _row_tile(h, w, channels, R, BLOCK_Q, BLOCK_M)
    base = _row_source_base(row, h, w, channels, out_h, out_w, R)
    x = tl.load(x_ptr + base + x_offsets, mask=mask, other=0.0).to(COMPUTE)
    mean = tl.sum(x) / width
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered) / width + eps)
    weight = tl.load(weight_ptr + k, mask=mask, other=0.0).to(COMPUTE)
    bias = tl.load(bias_ptr + k, mask=mask, other=0.0).to(COMPUTE)
    out = centered * rstd * weight + bias
    tl.store(out_ptr + tl.cast(row, tl.int64) * width + k, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layernorm_backward_kernel(
    grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_dw_ptr, partial_db_ptr,
    num_rows, h, w, channels, out_h, out_w,
    R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
):
    # Each program strides over rows, summing its rows' dweight/dbias in registers, and writes the sums to its
    # row of the partial buffers (summed afterwards: no float atomics, deterministic results).
    program = tl.program_id(0)
    width = R * R * channels
    x_offsets, k, mask = _row_tile(h, w, channels, R, BLOCK_Q, BLOCK_M)
    weight = tl.load(weight_ptr + k, mask=mask, other=0.0).to(COMPUTE)
    dw = tl.zeros((BLOCK_Q, BLOCK_M), dtype=COMPUTE)
    db = tl.zeros((BLOCK_Q, BLOCK_M), dtype=COMPUTE)
    for row in range(program, num_rows, tl.num_programs(0)):
        base = _row_source_base(row, h, w, channels, out_h, out_w, R)
        x = tl.load(x_ptr + base + x_offsets, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(grad_ptr + tl.cast(row, tl.int64) * width + k, mask=mask, other=0.0).to(COMPUTE)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        gw = g * weight
        mean_gw = tl.sum(gw) / width
        mean_gw_xhat = tl.sum(gw * xhat) / width
        dx = rstd * (gw - mean_gw - xhat * mean_gw_xhat)
        tl.store(dx_ptr + base + x_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += g * xhat
        db += g
    partial = program.to(tl.int64) * width + k
    tl.store(partial_dw_ptr + partial, dw, mask=mask)
    tl.store(partial_db_ptr + partial, db, mask=mask)


def _tile(factor: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_M, num_warps) for rows of factor chunks of factor*channels elements."""
    block_q = triton.next_power_of_2(factor)
    block_m = triton.next_power_of_2(factor * channels)
    num_warps = max(4, min(16, block_q * block_m // 512))
    return block_q, block_m, num_warps


def pixel_unshuffle_layernorm_triton(x, weight, bias, eps: float, factor: int):
    n, h, w, channels = x.shape
    out_h, out_w, width = h // factor, w // factor, factor * factor * channels
    num_rows = n * out_h * out_w
    out = torch.empty(n, out_h * out_w, width, device=x.device, dtype=x.dtype)
    mean = torch.empty(num_rows, device=x.device, dtype=stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    if num_rows == 0 or width == 0:
        return out, mean, rstd
    block_q, block_m, num_warps = _tile(factor, channels)
    _layernorm_kernel[(num_rows,)](
        x, weight, bias, out, mean, rstd,
        h, w, channels, out_h, out_w, eps,
        R=factor, BLOCK_Q=block_q, BLOCK_M=block_m,
        COMPUTE=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=num_warps,
    )
    return out, mean, rstd


def _num_partials(device: torch.device, num_rows: int) -> int:
    if device.type == "cuda":
        return min(num_rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(num_rows, 4)  # the interpreter: a few programs suffice


def pixel_unshuffle_layernorm_backward_triton(grad, x, weight, mean, rstd, factor: int):
    n, h, w, channels = x.shape
    out_h, out_w, width = h // factor, w // factor, factor * factor * channels
    num_rows = n * out_h * out_w
    dx = torch.empty_like(x)
    partials = _num_partials(x.device, num_rows)
    partial_dw = torch.zeros(partials, width, device=x.device, dtype=mean.dtype)
    partial_db = torch.zeros_like(partial_dw)
    if partials > 0 and width > 0:
        block_q, block_m, num_warps = _tile(factor, channels)
        _layernorm_backward_kernel[(partials,)](
            grad, x, weight, mean, rstd, dx, partial_dw, partial_db,
            num_rows, h, w, channels, out_h, out_w,
            R=factor, BLOCK_Q=block_q, BLOCK_M=block_m,
            COMPUTE=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=num_warps,
        )
    return dx, partial_dw.sum(0).to(weight.dtype), partial_db.sum(0).to(weight.dtype)
