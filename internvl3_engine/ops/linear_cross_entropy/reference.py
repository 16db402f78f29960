"""Plain PyTorch reference of linear_cross_entropy: the executable spec.

The op is a Linear layer in the input dtype (matmul with float32 accumulation, output rounded to the
input dtype, as ``torch.nn.functional.linear`` computes it) followed by a cross-entropy in float32
(float64 for float64 inputs). The gradient flowing back into the Linear layer is rounded to the input
dtype, exactly as autograd would round it between a float32 loss and a low-precision Linear layer.
The reference materialises the whole [T, V] logits; the chunked backends never do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax math and of the per-token results: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).to(accumulate_dtype(hidden.dtype))


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (ce, lse): lse_t = logsumexp(logits_t), ce_t = lse_t - logits_t[label_t] (0 where
    label_t == ignore_index). ``chunk_size`` is unused: the reference computes every row at once."""
    logits = _logits(hidden, weight, bias)
    lse = torch.logsumexp(logits, dim=-1)
    supervised = labels != ignore_index
    picked = logits.gather(1, torch.where(supervised, labels, 0)[:, None]).squeeze(1)
    ce = torch.where(supervised, lse - picked, 0)
    return ce, lse


def linear_cross_entropy_backward_reference(
    grad_ce: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    hidden_grad: bool = True,
    parameter_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (hidden, weight, bias) of sum_t grad_ce_t * ce_t. dlogits = (softmax - onehot(label)) *
    grad_ce, zero on ignored rows, rounded to the input dtype. An empty tensor stands for the bias gradient
    when there is no bias, for the hidden gradient when ``hidden_grad`` is false, and for the weight and
    bias gradients when ``parameter_grads`` is false."""
    logits = _logits(hidden, weight, bias)
    supervised = labels != ignore_index
    dlogits = torch.exp(logits - lse[:, None])
    rows = torch.arange(labels.shape[0], device=labels.device)
    dlogits[rows, torch.where(supervised, labels, 0)] -= 1
    dlogits *= torch.where(supervised, grad_ce.to(dlogits.dtype), 0)[:, None]
    dlogits = dlogits.to(hidden.dtype)
    # Fresh empty tensors: an operator's outputs must not alias one another.
    grad_hidden = dlogits @ weight if hidden_grad else hidden.new_empty(0)
    grad_weight = dlogits.t() @ hidden if parameter_grads else hidden.new_empty(0)
    if bias is None or not parameter_grads:
        grad_bias = hidden.new_empty(0)
    else:
        grad_bias = dlogits.sum(0, dtype=accumulate_dtype(hidden.dtype)).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def linear_cross_entropy_with_grads_reference(
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
    """(ce, grad_hidden, grad_weight, grad_bias): the per-token CE and, in the same call, the gradients of
    sum_t grad_ce_t * ce_t, as the forward and backward references compute them."""
    ce, lse = linear_cross_entropy_reference(hidden, weight, bias, labels, ignore_index, chunk_size)
    grads = linear_cross_entropy_backward_reference(
        grad_ce, hidden, weight, bias, labels, lse, ignore_index, chunk_size, hidden_grad, parameter_grads
    )
    return (ce, *grads)
