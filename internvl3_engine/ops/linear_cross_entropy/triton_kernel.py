"""Chunked linear_cross_entropy: cuBLAS matmuls per chunk of tokens, Triton kernels over the logits rows.

For each chunk of C tokens the logits [C, V] are computed by torch (cuBLAS on GPU) in the input dtype
into one reused buffer; a Triton kernel (one program per row) then reduces each row in float32: an online
max/sum over V in blocks gives lse, and the label's logit gives the CE. The backward recomputes the same
logits chunk and a second row kernel overwrites it in place with dlogits = (softmax - onehot(label)) *
grad_ce (rows of ignored tokens 0), which feeds the two gradient matmuls. Only one [C, V] buffer exists at
a time, never the whole [T, V] logits.

The backward recomputes the logits matmul rather than storing gradients during the forward (Liger's
approach for scalar losses, which must know grad_ce in the forward): recomputing serves every reduction,
per-token CE included, with one code path, for one extra matmul of the three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import accumulate_dtype

# Logits columns per block of the row loops; a module constant so that tests can shrink it to run the
# online reduction over several blocks with a partial last block.
BLOCK_V = 4096


@triton.jit
def _program_row(logits_ptr, labels_ptr, vocab, ignore_index, BLOCK_V: tl.constexpr):
    """(row, pointer to its logits, the column offsets of a block, its label, whether the label counts).
    Out-of-range labels (rejected before the launch) are treated as ignored: never read out of bounds."""
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    supervised = (label != ignore_index) & (label >= 0) & (label < vocab)
    return row, logits_ptr + row.to(tl.int64) * vocab, tl.arange(0, BLOCK_V), label, supervised


@triton.jit
def _lse_ce_kernel(
    logits_ptr, labels_ptr, ce_ptr, lse_ptr,
    vocab, ignore_index,
    COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, row_ptr, columns, label, supervised = _program_row(logits_ptr, labels_ptr, vocab, ignore_index, BLOCK_V)
    # One running max and sum per lane, combined once at the end: no cross-lane reduction in the loop.
    lane_max = tl.full([BLOCK_V], float("-inf"), COMPUTE)
    lane_sum = tl.zeros([BLOCK_V], COMPUTE)
    for start in range(0, vocab, BLOCK_V):
        index = start + columns
        x = tl.load(row_ptr + index, mask=index < vocab, other=float("-inf")).to(COMPUTE)
        new_max = tl.maximum(lane_max, x)
        # A lane that has seen only padding keeps max -inf; shift by 0 there so that exp(-inf - -inf)
        # (NaN) never occurs.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    picked = tl.load(row_ptr + tl.where(supervised, label, 0)).to(COMPUTE)
    tl.store(lse_ptr + row, lse)
    tl.store(ce_ptr + row, tl.where(supervised, lse - picked, 0.0))


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_ce_ptr,
    vocab, ignore_index,
    COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Overwrites a logits row with (softmax - onehot(label)) * grad_ce, or zeros for an ignored token."""
    row, row_ptr, columns, label, supervised = _program_row(logits_ptr, labels_ptr, vocab, ignore_index, BLOCK_V)
    lse = tl.load(lse_ptr + row).to(COMPUTE)
    grad = tl.load(grad_ce_ptr + row).to(COMPUTE)
    for start in range(0, vocab, BLOCK_V):
        index = start + columns
        mask = index < vocab
        x = tl.load(row_ptr + index, mask=mask, other=0.0).to(COMPUTE)
        dlogits = (tl.exp(x - lse) - tl.where(index == label, 1.0, 0.0)) * grad
        dlogits = tl.where(supervised, dlogits, 0.0)
        tl.store(row_ptr + index, dlogits.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_options(logits: torch.Tensor, vocab: int) -> dict:
    return dict(
        COMPUTE=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)),
    )


def _logits_chunk(buffer: torch.Tensor, hidden_chunk, weight, bias) -> torch.Tensor:
    """hidden_chunk @ weight.T (+ bias) into the first rows of ``buffer``, as F.linear computes it."""
    logits = buffer[: hidden_chunk.shape[0]]
    if bias is None:
        torch.mm(hidden_chunk, weight.t(), out=logits)
    else:
        torch.addmm(bias, hidden_chunk, weight.t(), out=logits)
    return logits


def linear_cross_entropy_triton(hidden, weight, bias, labels, ignore_index, chunk_size):
    """The 'triton' backend of the linear_cross_entropy operator: its arguments, per-token (ce, lse)."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    ce = hidden.new_empty(tokens, dtype=accumulate_dtype(hidden.dtype))
    lse = torch.empty_like(ce)
    if tokens == 0:
        return ce, lse
    buffer = hidden.new_empty(min(chunk_size, tokens), vocab)
    options = _launch_options(buffer, vocab)
    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        logits = _logits_chunk(buffer, hidden[start:end], weight, bias)
        _lse_ce_kernel[(end - start,)](
            logits, labels[start:end], ce[start:end], lse[start:end], vocab, ignore_index, **options
        )
    return ce, lse


def _accumulate_grad_weight(accumulator: torch.Tensor, dlogits: torch.Tensor, hidden_chunk: torch.Tensor) -> None:
    """accumulator += dlogits.T @ hidden_chunk, products accumulated and added in the accumulator's dtype."""
    if dlogits.dtype == accumulator.dtype:
        accumulator.addmm_(dlogits.t(), hidden_chunk)
    elif dlogits.is_cuda:
        # cuBLAS: half-precision inputs, float32 output, added in place (no [V, H] temporary).
        torch.addmm(accumulator, dlogits.t(), hidden_chunk, out_dtype=accumulator.dtype, out=accumulator)
    else:
        # CPU has no mixed-dtype matmul: the same arithmetic (exact products of the half-precision values,
        # float32 sums) through a float32 matmul.
        accumulator.addmm_(dlogits.t().to(accumulator.dtype), hidden_chunk.to(accumulator.dtype))


def linear_cross_entropy_backward_triton(grad_ce, hidden, weight, bias, labels, lse, ignore_index, chunk_size):
    """The 'triton' backend of the linear_cross_entropy_backward operator: its arguments, (grad_hidden,
    grad_weight, grad_bias)."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    accumulate = accumulate_dtype(hidden.dtype)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight, dtype=accumulate)
    grad_bias = hidden.new_empty(0) if bias is None else torch.zeros_like(bias, dtype=accumulate)
    if tokens > 0:
        buffer = hidden.new_empty(min(chunk_size, tokens), vocab)
        options = _launch_options(buffer, vocab)
        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            hidden_chunk = hidden[start:end]
            dlogits = _logits_chunk(buffer, hidden_chunk, weight, bias)
            _softmax_grad_kernel[(end - start,)](
                dlogits, labels[start:end], lse[start:end], grad_ce[start:end], vocab, ignore_index, **options
            )
            torch.mm(dlogits, weight, out=grad_hidden[start:end])
            _accumulate_grad_weight(grad_weight, dlogits, hidden_chunk)
            if bias is not None:
                grad_bias += dlogits.sum(0, dtype=accumulate)
    grad_bias = grad_bias if bias is None else grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias
