"""Chunked linear_cross_entropy: cuBLAS matmuls per chunk of tokens, Triton kernels over the logits rows.

For each chunk of C tokens the logits [C, V] are computed by torch (cuBLAS on GPU) in the input dtype
into one reused buffer; a Triton kernel (one program per row) then reduces each row in float32: an online
max/sum over V in blocks gives lse, and the label's logit gives the CE. A second row kernel overwrites the
chunk in place with dlogits = (softmax - onehot(label)) * grad_ce (rows of ignored tokens 0), which feeds
the two gradient matmuls. Only one [C, V] buffer exists at a time, never the whole [T, V] logits.

Two ways to get the gradients, both here:
- ``linear_cross_entropy_with_grads_triton``: forward and gradients in one pass over the chunks, for a
  scalar loss, whose per-token grad_ce is known in the forward up to the scalar upstream gradient (Liger's
  approach): three matmuls per chunk.
- ``linear_cross_entropy_triton`` then ``linear_cross_entropy_backward_triton``: the backward recomputes
  each chunk's logits (four matmuls per chunk), for any grad_ce, per-token losses included.
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


def _launch_options(dtype: torch.dtype, vocab: int) -> dict:
    return dict(
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)),
    )


def _logits_chunks(hidden, weight, bias, chunk_size):
    """(rows, hidden[rows], logits of those rows) per chunk of ``chunk_size`` tokens, the logits computed as
    F.linear computes them into one reused [chunk_size, V] buffer: each chunk's overwrites the last's."""
    tokens = hidden.shape[0]
    if tokens == 0:
        return
    buffer = hidden.new_empty(min(chunk_size, tokens), weight.shape[0])
    for start in range(0, tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, tokens))
        hidden_rows = hidden[rows]
        logits = buffer[: hidden_rows.shape[0]]
        if bias is None:
            torch.mm(hidden_rows, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden_rows, weight.t(), out=logits)
        yield rows, hidden_rows, logits


def _per_token(hidden):
    """Empty per-token (ce, lse) in the accumulate dtype."""
    ce = hidden.new_empty(hidden.shape[0], dtype=accumulate_dtype(hidden.dtype))
    return ce, torch.empty_like(ce)


def _lse_ce(logits, rows, labels, ce, lse, ignore_index, options):
    _lse_ce_kernel[(logits.shape[0],)](
        logits, labels[rows], ce[rows], lse[rows], logits.shape[1], ignore_index, **options
    )


def _softmax_grad(logits, rows, labels, lse, grad_ce, ignore_index, options):
    _softmax_grad_kernel[(logits.shape[0],)](
        logits, labels[rows], lse[rows], grad_ce[rows], logits.shape[1], ignore_index, **options
    )


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


class _Gradients:
    """The gradients of hidden, weight and bias built chunk by chunk from each chunk's dlogits. Those not
    wanted (``hidden_grad``, ``parameter_grads`` false; no bias) are never computed and come back empty.
    The weight and bias gradients are accumulated across chunks in float32 (float64 for float64 inputs)."""

    def __init__(self, hidden, weight, bias, hidden_grad: bool, parameter_grads: bool):
        accumulate = accumulate_dtype(hidden.dtype)
        self._hidden_like = hidden
        self.hidden = torch.empty_like(hidden) if hidden_grad else None
        self.weight = torch.zeros_like(weight, dtype=accumulate) if parameter_grads else None
        self.bias = torch.zeros_like(bias, dtype=accumulate) if parameter_grads and bias is not None else None

    def add(self, rows: slice, hidden_rows, dlogits, weight) -> None:
        if self.hidden is not None:
            torch.mm(dlogits, weight, out=self.hidden[rows])
        if self.weight is not None:
            _accumulate_grad_weight(self.weight, dlogits, hidden_rows)
        if self.bias is not None:
            self.bias += dlogits.sum(0, dtype=self.bias.dtype)

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtype (all alike); a fresh empty tensor for
        each one not computed (an operator's outputs must not alias one another)."""
        like = self._hidden_like
        return tuple(like.new_empty(0) if grad is None else grad.to(like.dtype) for grad in (self.hidden, self.weight, self.bias))


def linear_cross_entropy_triton(hidden, weight, bias, labels, ignore_index, chunk_size):
    """The 'triton' backend of the linear_cross_entropy operator: its arguments, per-token (ce, lse)."""
    ce, lse = _per_token(hidden)
    options = _launch_options(hidden.dtype, weight.shape[0])
    for rows, _, logits in _logits_chunks(hidden, weight, bias, chunk_size):
        _lse_ce(logits, rows, labels, ce, lse, ignore_index, options)
    return ce, lse


def linear_cross_entropy_backward_triton(
    grad_ce, hidden, weight, bias, labels, lse, ignore_index, chunk_size, hidden_grad, parameter_grads
):
    """The 'triton' backend of the linear_cross_entropy_backward operator: its arguments, (grad_hidden,
    grad_weight, grad_bias), recomputing each chunk's logits."""
    grads = _Gradients(hidden, weight, bias, hidden_grad, parameter_grads)
    options = _launch_options(hidden.dtype, weight.shape[0])
    for rows, hidden_rows, logits in _logits_chunks(hidden, weight, bias, chunk_size):
        _softmax_grad(logits, rows, labels, lse, grad_ce, ignore_index, options)
        grads.add(rows, hidden_rows, logits, weight)
    return grads.results()


def linear_cross_entropy_with_grads_triton(
    hidden, weight, bias, labels, grad_ce, ignore_index, chunk_size, hidden_grad, parameter_grads
):
    """The 'triton' backend of the linear_cross_entropy_with_grads operator: its arguments, (ce,
    grad_hidden, grad_weight, grad_bias), each chunk's logits computed once."""
    ce, lse = _per_token(hidden)
    grads = _Gradients(hidden, weight, bias, hidden_grad, parameter_grads)
    options = _launch_options(hidden.dtype, weight.shape[0])
    for rows, hidden_rows, logits in _logits_chunks(hidden, weight, bias, chunk_size):
        _lse_ce(logits, rows, labels, ce, lse, ignore_index, options)
        _softmax_grad(logits, rows, labels, lse, grad_ce, ignore_index, options)
        grads.add(rows, hidden_rows, logits, weight)
    return (ce, *grads.results())
