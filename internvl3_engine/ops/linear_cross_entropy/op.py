"""linear_cross_entropy: validation, backend dispatch, the torch.library operators and their autograd, and
the loss reductions (plain torch on the per-token CE, so autograd and torch.compile see through them)."""

from __future__ import annotations

import torch

from ...autocast import autocast_inputs, kernels_at_input_dtype
from ...dispatch import KernelSet
from ...validation import FLOAT_DTYPES, check_float, check_int, check_length, check_tensor
from ..library import operator
from .reference import (
    accumulate_dtype,
    linear_cross_entropy_backward_reference,
    linear_cross_entropy_reference,
    linear_cross_entropy_with_grads_reference,
)


def _forward_triton(*args):
    from .triton_kernel import linear_cross_entropy_triton  # imported on first use (see KernelSet)

    return linear_cross_entropy_triton(*args)


def _backward_triton(*args):
    from .triton_kernel import linear_cross_entropy_backward_triton

    return linear_cross_entropy_backward_triton(*args)


def _with_grads_triton(*args):
    from .triton_kernel import linear_cross_entropy_with_grads_triton

    return linear_cross_entropy_with_grads_triton(*args)


# No compiled kernel: the work is two cuBLAS matmuls per chunk plus a row reduction, which the Triton
# kernels already do at memory speed.
LINEAR_CROSS_ENTROPY = KernelSet(
    "linear_cross_entropy", torch=linear_cross_entropy_reference, triton=_forward_triton, gpu_order=("triton", "torch")
)
LINEAR_CROSS_ENTROPY_BACKWARD = KernelSet(
    "linear_cross_entropy_backward",
    torch=linear_cross_entropy_backward_reference,
    triton=_backward_triton,
    gpu_order=("triton", "torch"),
)
LINEAR_CROSS_ENTROPY_WITH_GRADS = KernelSet(
    "linear_cross_entropy_with_grads",
    torch=linear_cross_entropy_with_grads_reference,
    triton=_with_grads_triton,
    gpu_order=("triton", "torch"),
)

REDUCTIONS = ("none", "sum", "mean")
_INT64_RANGE = (-(2**63), 2**63 - 1)
# Bytes of one chunk's logits counted in float32: 256 MiB on GPU (442 tokens at V = 151674; the matmuls
# stay large enough to run at full speed), 16 MiB on CPU (the reference's own memory is then the concern).
_CHUNK_BYTES = {"cuda": 256 * 2**20}
_CHUNK_BYTES_OTHER = 16 * 2**20


def default_chunk_size(vocab: int, device: torch.device) -> int:
    """Tokens per chunk so that a chunk's [C, V] logits take at most ~256 MiB in float32 on GPU (16 MiB
    elsewhere), at least 1."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_OTHER)
    return max(1, budget // (4 * max(vocab, 1)))


def _check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is ignore_index or in [0, vocab) (reads the values: one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocabulary of weight) or ignore_index ({ignore_index}), "
            f"got {int(labels[where])} at token {where}"
        )


def _linear_cross_entropy_fake(hidden, weight, bias, labels, ignore_index, chunk_size):
    ce = hidden.new_empty(hidden.shape[0], dtype=accumulate_dtype(hidden.dtype))
    return ce, torch.empty_like(ce)


def _gradients_fake(hidden, weight, bias, hidden_grad, parameter_grads):
    return (
        torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0),
        torch.empty_like(weight) if parameter_grads else hidden.new_empty(0),
        torch.empty_like(bias) if parameter_grads and bias is not None else hidden.new_empty(0),
    )


def _linear_cross_entropy_backward_fake(
    grad_ce, hidden, weight, bias, labels, lse, ignore_index, chunk_size, hidden_grad, parameter_grads
):
    return _gradients_fake(hidden, weight, bias, hidden_grad, parameter_grads)


def _linear_cross_entropy_with_grads_fake(
    hidden, weight, bias, labels, grad_ce, ignore_index, chunk_size, hidden_grad, parameter_grads
):
    ce, _ = _linear_cross_entropy_fake(hidden, weight, bias, labels, ignore_index, chunk_size)
    return (ce, *_gradients_fake(hidden, weight, bias, hidden_grad, parameter_grads))


@operator("linear_cross_entropy", fake=_linear_cross_entropy_fake)
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, lse): per-token cross-entropy and the logits' log-sum-exp, float32 [T] (float64 for float64 inputs)."""
    _check_label_values(labels, weight.shape[0], ignore_index)
    return LINEAR_CROSS_ENTROPY.select(hidden.device)(hidden, weight, bias, labels, ignore_index, chunk_size)


@operator("linear_cross_entropy_backward", fake=_linear_cross_entropy_backward_fake)
def linear_cross_entropy_backward_op(
    grad_ce: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    hidden_grad: bool,
    parameter_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_t grad_ce_t * ce_t, recomputing the logits. A gradient
    not asked for (``hidden_grad``; ``parameter_grads``: weight and bias) or of an absent bias is an empty
    tensor (a schema cannot return an optional tensor)."""
    return LINEAR_CROSS_ENTROPY_BACKWARD.select(hidden.device)(
        grad_ce, hidden, weight, bias, labels, lse, ignore_index, chunk_size, hidden_grad, parameter_grads
    )


@operator("linear_cross_entropy_with_grads", fake=_linear_cross_entropy_with_grads_fake)
def linear_cross_entropy_with_grads_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    grad_ce: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    hidden_grad: bool,
    parameter_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce, grad_hidden, grad_weight, grad_bias): the per-token CE and the gradients of sum_t grad_ce_t *
    ce_t in one pass over the logits (the gradients as linear_cross_entropy_backward returns them)."""
    _check_label_values(labels, weight.shape[0], ignore_index)
    return LINEAR_CROSS_ENTROPY_WITH_GRADS.select(hidden.device)(
        hidden, weight, bias, labels, grad_ce, ignore_index, chunk_size, hidden_grad, parameter_grads
    )


def _weighted_total(token_weights: torch.Tensor, ce: torch.Tensor, divisor: torch.Tensor | None) -> torch.Tensor:
    """The scalar loss: sum(w * CE), divided by ``divisor`` unless it is None. Both autograd paths return it,
    so that precompute_grads never changes the loss's value."""
    total = (token_weights * ce).sum()
    return total if divisor is None else total / divisor


def _only_wanted(grads, wanted) -> list[torch.Tensor | None]:
    """The gradients autograd asked for, None for the others (computed empty, or not to be returned)."""
    return [grad if wants else None for grad, wants in zip(grads, wanted)]


class _LinearCrossEntropy(torch.autograd.Function):
    """The per-token cross-entropy; the logits' log-sum-exp is kept for the backward, which recomputes the
    logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_size: int) -> torch.Tensor:
        ce, lse = linear_cross_entropy_op(hidden, weight, bias, labels, ignore_index, chunk_size)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        grads = linear_cross_entropy_backward_op(
            grad_ce.contiguous(), hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.chunk_size,
            wanted[0], wanted[1] or wanted[2],
        )
        return (*_only_wanted(grads, wanted), None, None, None)


class _WeightedCrossEntropy(torch.autograd.Function):
    """The scalar loss sum_t w_t * CE_t (divided by ``divisor`` unless it is None), its gradients computed
    in the forward: the per-token gradient the sum sends to CE_t, w_t / divisor, is known before the
    backward up to the scalar upstream gradient, so each chunk's logits serve the loss and the gradients
    at once. The backward scales the kept gradients by the upstream gradient."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, token_weights, divisor, ignore_index: int, chunk_size: int,
        hidden_grad: bool, parameter_grads: bool,
    ) -> torch.Tensor:
        # What autograd would send to CE_t through total / divisor: w_t * (1 / divisor).
        grad_ce = token_weights if divisor is None else token_weights * (1 / divisor)
        ce, *grads = linear_cross_entropy_with_grads_op(
            hidden, weight, bias, labels, grad_ce, ignore_index, chunk_size, hidden_grad, parameter_grads
        )
        ctx.save_for_backward(*grads)
        return _weighted_total(token_weights, ce, divisor)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        scaled = [grad * grad_loss for grad in ctx.saved_tensors]
        return (*_only_wanted(scaled, ctx.needs_input_grad[:3]), None, None, None, None, None, None, None)


def _check_same(name: str, value: torch.Tensor, hidden: torch.Tensor) -> None:
    if value.dtype != hidden.dtype:
        raise TypeError(
            f"{name} must have the dtype of hidden ({str(hidden.dtype).replace('torch.', '')}), "
            f"got {str(value.dtype).replace('torch.', '')}"
        )
    check_tensor(name, value, device=hidden.device)


def _check_normalizer(normalizer, device: torch.device):
    if isinstance(normalizer, torch.Tensor):
        if not normalizer.is_floating_point():
            raise TypeError(f"normalizer must be a floating-point tensor, got {str(normalizer.dtype).replace('torch.', '')}")
        check_tensor("normalizer", normalizer, ndim=0, device=device)
        return normalizer
    return check_float("normalizer", normalizer, positive=True)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    precompute_grads: bool = True,
) -> torch.Tensor:
    """Cross-entropy of the LLM head without materialising the [T, V] logits.

    ``hidden`` [T, H] and ``weight`` [V, H] (the untied lm_head; same float dtype and device), ``bias``
    [V] or None, ``labels`` int64 or int32 [T]. logits = hidden @ weight.T + bias is computed like a
    Linear layer (input-dtype matmul with float32 accumulation) and CE_t = logsumexp(logits_t) -
    logits_t[label_t] in float32 (float64 for float64 inputs). Labels must be in [0, V) or
    ``ignore_index`` (ValueError; checked on the values: one host sync).

    Token weights w: ``loss_weights`` float32 [T] (e.g. ``internvl3_engine.loss_weights``), or 1 for
    every supervised token when None; tokens labelled ``ignore_index`` always weigh 0.
    ``reduction``: 'none' -> float32 [T] w * CE per token (plain CE, 0 at ignored tokens, when
    loss_weights is None: summed response log-probs for MPO); 'sum' -> sum(w * CE); 'mean' ->
    sum(w * CE) / normalizer, with normalizer sum(w) by default (InternVL's sum(w * CE) / sum(w); with
    loss_weights None, torch's cross_entropy mean). A given ``normalizer`` (positive float, or 0-d
    tensor, e.g. sum(w) all-reduced over data-parallel ranks; a tensor's value is not checked) replaces
    sum(w). When the divisor is 0 (no supervised token) the mean is sum(w * CE), i.e. 0 with 0 gradients,
    not NaN.

    Under torch.autocast, hidden, weight and bias are cast to the autocast dtype first (as nn.Linear's are).

    Differentiable in hidden, weight and bias (not twice; a tensor ``normalizer`` takes no gradient). The
    Triton backend works on chunks of ``chunk_size`` tokens (default: a chunk's logits take ~256 MiB in
    float32 on GPU, 16 MiB on CPU); the weight and bias gradients are accumulated across chunks in float32
    and returned in the parameters' dtype. The 'torch' backend (the reference, also 'auto' on CPU)
    materialises the whole logits.

    ``precompute_grads`` (default True): for 'sum' and 'mean' under autograd, the gradients are computed in
    the forward, from the same logits as the loss (three matmuls over the head instead of four), kept
    until the backward and scaled there by the upstream gradient (one more rounding when that is not 1).
    Their memory (weight's size and hidden's) is held from the loss to its backward, normally the next
    thing that runs; the float32 weight accumulator lives only inside the call, as the recomputing
    backward's does. False, or reduction 'none' (whose per-token upstream gradient comes only in the
    backward), recomputes each chunk's logits in the backward instead.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, ndim=2)
    _check_same("weight", weight, hidden)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have the hidden size of hidden ({hidden.shape[1]}) as its dim 1, got shape {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (the vocabulary), got 0")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        _check_same("bias", bias, hidden)
        check_length("bias", bias, vocab, "one per row of weight")
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), ndim=1, device=hidden.device)
    check_length("labels", labels, hidden.shape[0], "one per token of hidden")
    if loss_weights is not None:
        check_tensor("loss_weights", loss_weights, dtypes=(torch.float32,), ndim=1, device=hidden.device)
        check_length("loss_weights", loss_weights, hidden.shape[0], "one per token of hidden")
    ignore_index = check_int("ignore_index", ignore_index)
    if not _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, one of {REDUCTIONS}, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer is only used with reduction='mean', got reduction={reduction!r}")
        normalizer = _check_normalizer(normalizer, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, hidden.device)
    elif check_int("chunk_size", chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not isinstance(precompute_grads, bool):
        raise TypeError(f"precompute_grads must be a bool, got {type(precompute_grads).__name__}")

    labels = labels.to(torch.int64).contiguous()
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    hidden_grad = hidden.requires_grad
    parameter_grads = weight.requires_grad or (bias is not None and bias.requires_grad)
    precompute = precompute_grads and reduction != "none" and torch.is_grad_enabled() and (hidden_grad or parameter_grads)
    if reduction == "none" and loss_weights is None:
        with kernels_at_input_dtype(hidden.device):
            return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk_size)
    supervised = labels != ignore_index
    accumulate = accumulate_dtype(hidden.dtype)
    if loss_weights is None:
        weights = supervised.to(accumulate)
    else:
        weights = torch.where(supervised, loss_weights.to(accumulate), 0)
    divisor = None
    if reduction == "mean":
        if normalizer is None:
            divisor = weights.sum()
        else:  # a constant, as the gradients computed in the forward must take it
            divisor = torch.as_tensor(normalizer, dtype=accumulate, device=hidden.device).detach()
        # A zero divisor means no weighted token: the total is 0, and dividing by 1 keeps loss and gradients 0.
        divisor = torch.where(divisor != 0, divisor, 1)
    with kernels_at_input_dtype(hidden.device):
        if precompute:
            return _WeightedCrossEntropy.apply(
                hidden, weight, bias, labels, weights, divisor, ignore_index, chunk_size, hidden_grad, parameter_grads
            )
        ce = _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk_size)
    if reduction == "none":
        return weights * ce
    return _weighted_total(weights, ce, divisor)
