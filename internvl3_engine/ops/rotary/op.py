"""apply_rotary: validation, backend dispatch, the torch.library operators, and their autograd."""

from __future__ import annotations

import torch

from ... import extension
from ...dispatch import KernelSet
from ...validation import FLOAT_DTYPES, check_float, check_int, check_length, check_tensor
from ..library import operator
from .reference import rotary_inv_freq, rotary_reference


def _rotary_triton(x, positions, inv_freq, inverse):
    from .triton_kernel import rotary_triton  # imported on first use (see KernelSet)

    return rotary_triton(x, positions, inv_freq, inverse)


ROTARY = KernelSet("apply_rotary", torch=rotary_reference, triton=_rotary_triton, cuda=extension.rotary)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int, inverse: bool) -> torch.Tensor:
    inv_freq = rotary_inv_freq(rotary_dim, theta, x.device)
    return ROTARY.select(x.device)(x, positions, inv_freq, inverse)


def _rotated_fake(x, positions, theta, rotary_dim):
    return torch.empty_like(x)


@operator("apply_rotary", fake=_rotated_fake)
def apply_rotary_op(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    return _rotate(x, positions, theta, rotary_dim, inverse=False)


@operator("apply_rotary_backward", fake=_rotated_fake)
def apply_rotary_backward_op(grad: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    return _rotate(grad, positions, theta, rotary_dim, inverse=True)


class _Rotary(torch.autograd.Function):
    """The rotation (inverse=False) or its inverse: linear maps, each the other's gradient (so twice differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int, inverse: bool) -> torch.Tensor:
        ctx.theta, ctx.rotary_dim, ctx.inverse = theta, rotary_dim, inverse
        ctx.save_for_backward(positions)
        return (apply_rotary_backward_op if inverse else apply_rotary_op)(x, positions, theta, rotary_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        dx = _Rotary.apply(grad.contiguous(), positions, ctx.theta, ctx.rotary_dim, not ctx.inverse)
        return dx, None, None, None, None


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 1e6, rotary_dim: int | None = None) -> torch.Tensor:
    """Qwen2 half-split rotary embedding of ``x`` [T, H, D] at float32 ``positions`` [T] (V2PE positions).

    inv_freq_i = theta^(-2i/rotary_dim); angles are computed in float32 from the float32 positions, so
    fractional visual positions are kept exactly. Pairs (i, i + rotary_dim/2) for i < rotary_dim/2 rotate;
    dims from rotary_dim on pass through (rotary_dim=None: the whole head). Differentiable in ``x``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("positions", positions, dtypes=(torch.float32,), ndim=1, device=x.device)
    check_length("positions", positions, x.shape[0], "one per token of x")
    theta = check_float("theta", theta, positive=True)
    head_dim = x.shape[2]
    rotary_dim = head_dim if rotary_dim is None else check_int("rotary_dim", rotary_dim)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in [2, head dim {head_dim}], got {rotary_dim}")
    return _Rotary.apply(x.contiguous(), positions.contiguous(), theta, rotary_dim, False)
