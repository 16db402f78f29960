"""scatter_visual: validation, backend dispatch, the torch.library operators, and their autograd."""

from __future__ import annotations

import torch

from ... import extension
from ...dispatch import KernelSet
from ...validation import FLOAT_DTYPES, check_length, check_tensor, remembered
from ..library import operator
from .reference import scatter_visual_backward_reference, scatter_visual_reference


def _forward_torch(text, visual, is_visual, visual_before):
    return scatter_visual_reference(text, visual, is_visual)


def _backward_torch(grad, is_visual, visual_before, num_visual):
    return scatter_visual_backward_reference(grad, is_visual)


def _forward_triton(text, visual, is_visual, visual_before):
    from .triton_kernel import scatter_visual_triton  # imported on first use (see KernelSet)

    return scatter_visual_triton(text, visual, is_visual, visual_before)


def _backward_triton(grad, is_visual, visual_before, num_visual):
    from .triton_kernel import scatter_visual_backward_triton

    return scatter_visual_backward_triton(grad, is_visual, visual_before, num_visual)


SCATTER_VISUAL = KernelSet("scatter_visual", torch=_forward_torch, triton=_forward_triton, cuda=extension.scatter_visual)
SCATTER_VISUAL_BACKWARD = KernelSet(
    "scatter_visual_backward", torch=_backward_torch, triton=_backward_triton, cuda=extension.scatter_visual_backward
)


def _visual_before(is_visual: torch.Tensor, num_visual: int) -> torch.Tensor:
    """int64 [T]: the number of visual tokens before each token, i.e. the visual row a visual token takes.

    The exclusive prefix sum is computed here with torch.cumsum rather than inside the kernels: it is a
    dependency across the whole pack (a one-row-per-block kernel cannot see the rows before it without a
    second pass), and the scan reads T bytes against the T*C elements the copy moves, so a tuned library
    scan costs nothing measurable. Its last entry gives the visual count, checked against num_visual: a host
    sync, remembered on is_visual (validation.remembered), so one batch's forward and backward sync once.
    """
    inclusive = torch.cumsum(is_visual, dim=0, dtype=torch.int64)
    count = remembered(is_visual, "_internvl3_engine_visual_count", None, lambda: count_visual(inclusive))
    if count != num_visual:
        raise ValueError(
            f"visual_embeds must have one row per visual token: is_visual marks {count} visual tokens, "
            f"visual_embeds has {num_visual} rows"
        )
    return inclusive - is_visual.to(torch.int64)


def count_visual(inclusive: torch.Tensor) -> int:
    """The visual count from the inclusive prefix sum of is_visual (reads a value: a host sync on a GPU)."""
    return int(inclusive[-1]) if inclusive.numel() else 0


def _scatter_fake(text_embeds, visual_embeds, is_visual):
    return torch.empty_like(text_embeds)


def _split_fake(grad, is_visual, num_visual):
    return torch.empty_like(grad), grad.new_empty(num_visual, grad.shape[1])


@operator("scatter_visual", fake=_scatter_fake)
def scatter_visual_op(text_embeds: torch.Tensor, visual_embeds: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    visual_before = _visual_before(is_visual, visual_embeds.shape[0])
    return SCATTER_VISUAL.select(text_embeds.device)(text_embeds, visual_embeds, is_visual, visual_before)


@operator("scatter_visual_backward", fake=_split_fake)
def scatter_visual_backward_op(grad: torch.Tensor, is_visual: torch.Tensor, num_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    visual_before = _visual_before(is_visual, num_visual)
    return SCATTER_VISUAL_BACKWARD.select(grad.device)(grad, is_visual, visual_before, num_visual)


# The backward is the adjoint of a linear map (the scatter); the adjoint's own adjoint is the scatter again,
# so each Function's backward applies the other (twice differentiable).


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text_embeds: torch.Tensor, visual_embeds: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
        ctx.num_visual = visual_embeds.shape[0]
        ctx.save_for_backward(is_visual)
        return scatter_visual_op(text_embeds, visual_embeds, is_visual)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (is_visual,) = ctx.saved_tensors
        grad_text, grad_visual = _Split.apply(grad.contiguous(), is_visual, ctx.num_visual)
        return grad_text, grad_visual, None


class _Split(torch.autograd.Function):
    """The scatter's adjoint: (grad with the visual rows zeroed, the visual rows in order)."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, is_visual: torch.Tensor, num_visual: int):
        ctx.text_shape, ctx.visual_shape = tuple(grad.shape), (num_visual, grad.shape[1])
        ctx.save_for_backward(is_visual)
        return scatter_visual_backward_op(grad, is_visual, num_visual)

    @staticmethod
    def backward(ctx, grad_of_text: torch.Tensor | None, grad_of_visual: torch.Tensor | None):
        # An output that was not used gets no gradient (None): it contributes zeros.
        (is_visual,) = ctx.saved_tensors
        if grad_of_text is None:
            grad_of_text = grad_of_visual.new_zeros(ctx.text_shape)
        if grad_of_visual is None:
            grad_of_visual = grad_of_text.new_zeros(ctx.visual_shape)
        return _Scatter.apply(grad_of_text.contiguous(), grad_of_visual.contiguous(), is_visual), None, None


def scatter_visual(text_embeds: torch.Tensor, visual_embeds: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    """Place the visual rows over the text embeddings: InternVL's projected image rows ``visual_embeds``
    [V, C] replace, in order, the embeddings of the ``<IMG_CONTEXT>`` tokens in ``text_embeds`` [T, C].

    Row t of the result is visual_embeds[j] when ``is_visual[t]`` (bool [T]) and t is the (j+1)-th visual
    token, else text_embeds[t]. Out of place; V must equal the number of visual tokens (ValueError,
    checked on the values: one host sync per mask, remembered on is_visual until it changes in place, so
    a batch's forward and backward sync once). Differentiable in both embeddings: the text gradient is the
    output gradient with the visual rows zeroed, the visual gradient its visual rows in order.
    """
    check_tensor("text_embeds", text_embeds, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("visual_embeds", visual_embeds, ndim=2)
    if visual_embeds.dtype != text_embeds.dtype:
        raise TypeError(
            f"visual_embeds must have the dtype of text_embeds ({str(text_embeds.dtype).replace('torch.', '')}), "
            f"got {str(visual_embeds.dtype).replace('torch.', '')}"
        )
    check_tensor("visual_embeds", visual_embeds, device=text_embeds.device)
    if visual_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"visual_embeds must have the row size of text_embeds ({text_embeds.shape[1]}), got {visual_embeds.shape[1]}"
        )
    check_tensor("is_visual", is_visual, dtypes=(torch.bool,), ndim=1, device=text_embeds.device)
    check_length("is_visual", is_visual, text_embeds.shape[0], "one per token of text_embeds")
    return _Scatter.apply(text_embeds.contiguous(), visual_embeds.contiguous(), is_visual.contiguous())
