"""pixel_unshuffle and pixel_unshuffle_layernorm: validation, backend dispatch, the torch.library operators,
and their autograd."""

from __future__ import annotations

import torch

from ... import extension
from ...dispatch import KernelSet
from ...validation import FLOAT_DTYPES, check_float, check_tensor
from ..library import operator
from .reference import (
    pixel_unshuffle_backward_reference,
    pixel_unshuffle_layernorm_backward_reference,
    pixel_unshuffle_layernorm_reference,
    pixel_unshuffle_reference,
    stats_dtype,
)


def _unshuffle_triton(x, factor):
    from .triton_kernel import pixel_unshuffle_triton  # imported on first use (see KernelSet)

    return pixel_unshuffle_triton(x, factor)


def _shuffle_triton(grad, factor):
    from .triton_kernel import pixel_unshuffle_backward_triton

    return pixel_unshuffle_backward_triton(grad, factor)


def _layernorm_triton(x, weight, bias, eps, factor):
    from .triton_kernel import pixel_unshuffle_layernorm_triton

    return pixel_unshuffle_layernorm_triton(x, weight, bias, eps, factor)


def _layernorm_backward_triton(grad, x, weight, mean, rstd, factor):
    from .triton_kernel import pixel_unshuffle_layernorm_backward_triton

    return pixel_unshuffle_layernorm_backward_triton(grad, x, weight, mean, rstd, factor)


PIXEL_UNSHUFFLE = KernelSet(
    "pixel_unshuffle", torch=pixel_unshuffle_reference, triton=_unshuffle_triton, cuda=extension.pixel_unshuffle
)
PIXEL_UNSHUFFLE_BACKWARD = KernelSet(
    "pixel_unshuffle_backward",
    torch=pixel_unshuffle_backward_reference,
    triton=_shuffle_triton,
    cuda=extension.pixel_unshuffle_backward,
)
PIXEL_UNSHUFFLE_LAYERNORM = KernelSet(
    "pixel_unshuffle_layernorm",
    torch=pixel_unshuffle_layernorm_reference,
    triton=_layernorm_triton,
    cuda=extension.pixel_unshuffle_layernorm,
)
PIXEL_UNSHUFFLE_LAYERNORM_BACKWARD = KernelSet(
    "pixel_unshuffle_layernorm_backward",
    torch=pixel_unshuffle_layernorm_backward_reference,
    triton=_layernorm_backward_triton,
    cuda=extension.pixel_unshuffle_layernorm_backward,
)


# ---- pixel_unshuffle: a permutation; its backward is the inverse permutation and vice versa.


def _unshuffle_fake(x, factor):
    n, h, w, channels = x.shape
    return x.new_empty(n, h // factor, w // factor, factor * factor * channels)


def _shuffle_fake(grad, factor):
    n, out_h, out_w, width = grad.shape
    return grad.new_empty(n, out_h * factor, out_w * factor, width // (factor * factor))


@operator("pixel_unshuffle", fake=_unshuffle_fake)
def pixel_unshuffle_op(x: torch.Tensor, factor: int) -> torch.Tensor:
    return PIXEL_UNSHUFFLE.select(x.device)(x, factor)


@operator("pixel_unshuffle_backward", fake=_shuffle_fake)
def pixel_unshuffle_backward_op(grad: torch.Tensor, factor: int) -> torch.Tensor:
    return PIXEL_UNSHUFFLE_BACKWARD.select(grad.device)(grad, factor)


class _Permute(torch.autograd.Function):
    """pixel_unshuffle (inverse=False) or its inverse; each one's gradient is the other (so twice differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: int, inverse: bool) -> torch.Tensor:
        ctx.factor, ctx.inverse = factor, inverse
        return (pixel_unshuffle_backward_op if inverse else pixel_unshuffle_op)(x, factor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Permute.apply(grad.contiguous(), ctx.factor, not ctx.inverse), None, None


# ---- pixel_unshuffle_layernorm: the operator returns (out, mean, rstd); mean and rstd are kept for the backward.


def _layernorm_fake(x, weight, bias, eps, factor):
    n, h, w, channels = x.shape
    rows = (h // factor) * (w // factor)
    stats = x.new_empty(n * rows, dtype=stats_dtype(x.dtype))
    return x.new_empty(n, rows, factor * factor * channels), stats, torch.empty_like(stats)


def _layernorm_backward_fake(grad, x, weight, mean, rstd, factor):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


@operator("pixel_unshuffle_layernorm", fake=_layernorm_fake)
def pixel_unshuffle_layernorm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, factor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return PIXEL_UNSHUFFLE_LAYERNORM.select(x.device)(x, weight, bias, eps, factor)


@operator("pixel_unshuffle_layernorm_backward", fake=_layernorm_backward_fake)
def pixel_unshuffle_layernorm_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return PIXEL_UNSHUFFLE_LAYERNORM_BACKWARD.select(x.device)(grad, x, weight, mean, rstd, factor)


class _PixelUnshuffleLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, factor: int) -> torch.Tensor:
        out, mean, rstd = pixel_unshuffle_layernorm_op(x, weight, bias, eps, factor)
        ctx.factor = factor
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = pixel_unshuffle_layernorm_backward_op(grad.contiguous(), x, weight, mean, rstd, ctx.factor)
        return dx, dweight, dbias, None, None


# ---- public wrappers


def _factor(scale_factor) -> int:
    """r = 1 / scale_factor, which must be an integer >= 1."""
    scale_factor = check_float("scale_factor", scale_factor, positive=True)
    inverse = 1.0 / scale_factor
    factor = round(inverse)
    if factor < 1 or abs(inverse - factor) > 1e-6 * factor:
        raise ValueError(f"scale_factor must be 1/r for an integer r >= 1 (0.5, 1/3, ...), got {scale_factor}")
    return factor


def _check_x(x, factor: int) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=4)
    _, h, w, _ = x.shape
    if h % factor or w % factor:
        raise ValueError(f"x's h and w must be divisible by r = {factor} (1/scale_factor), got shape {tuple(x.shape)}")


def pixel_unshuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel unshuffle ("pixel_shuffle" with scale 0.5, ps_version 'v2') of x [N, h, w, C].

    Returns [N, h/r, w/r, r*r*C] with r = 1/scale_factor and
    out[n, i, j, k] = x[n, r*i + k // (r*C), r*j + (k % (r*C)) // C, k % C]: not the channel order of
    torch.nn.functional.pixel_unshuffle. Exact (pure data movement) on every backend; differentiable.
    """
    factor = _factor(scale_factor)
    _check_x(x, factor)
    return _Permute.apply(x.contiguous(), factor, False)


def pixel_unshuffle_layernorm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *, scale_factor: float = 0.5
) -> torch.Tensor:
    """LayerNorm(r*r*C) of pixel_unshuffle(x) flattened to [N, h*w/r^2, r*r*C]: the InternVL3 projector's
    first layer, fused (each output row gathers its r contiguous chunks of x once).

    Statistics in float32 (float64 for float64 x), output in x.dtype; weight and bias [r*r*C] share one
    float dtype, which may differ from x's. Differentiable in x, weight and bias.
    """
    factor = _factor(scale_factor)
    _check_x(x, factor)
    width = factor * factor * x.shape[3]
    for name, param in (("weight", weight), ("bias", bias)):
        check_tensor(name, param, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
        if param.shape[0] != width:
            raise ValueError(f"{name} must have r*r*C = {width} entries (one per output channel), got {param.shape[0]}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    eps = check_float("eps", eps, positive=True)
    return _PixelUnshuffleLayerNorm.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), eps, factor)
