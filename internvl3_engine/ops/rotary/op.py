"""apply_rotary: validation, backend dispatch, and the torch.library custom ops with autograd."""

from __future__ import annotations

import torch

from ...dispatch import KernelSet, lazy
from ...extension import compiled
from ...validation import FLOAT_DTYPES, check_float, check_int, check_length, check_tensor
from .reference import rotary_inv_freq, rotary_reference


ROTARY = KernelSet(
    "apply_rotary", torch=rotary_reference, triton=lazy(f"{__package__}.triton_kernel", "rotary_triton"), cuda=compiled("rotary")
)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int, inverse: bool) -> torch.Tensor:
    inv_freq = rotary_inv_freq(rotary_dim, theta, x.device)
    return ROTARY.select(x.device)(x, positions, inv_freq, inverse)


@torch.library.custom_op("internvl3_engine::apply_rotary", mutates_args=())
def apply_rotary_op(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    return _rotate(x, positions, theta, rotary_dim, inverse=False)


@torch.library.custom_op("internvl3_engine::apply_rotary_backward", mutates_args=())
def apply_rotary_backward_op(grad: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    return _rotate(grad, positions, theta, rotary_dim, inverse=True)


@apply_rotary_op.register_fake
def _(x, positions, theta, rotary_dim):
    return torch.empty_like(x)


@apply_rotary_backward_op.register_fake
def _(grad, positions, theta, rotary_dim):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    _, positions, ctx.theta, ctx.rotary_dim = inputs
    ctx.save_for_backward(positions)


def _backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return apply_rotary_backward_op(grad.contiguous(), positions, ctx.theta, ctx.rotary_dim), None, None, None


def _backward_of_backward(ctx, grad):
    # The backward is the inverse rotation, a linear map whose own backward is the forward rotation.
    (positions,) = ctx.saved_tensors
    return apply_rotary_op(grad.contiguous(), positions, ctx.theta, ctx.rotary_dim), None, None, None


apply_rotary_op.register_autograd(_backward, setup_context=_setup_context)
apply_rotary_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_context)


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
    return apply_rotary_op(x.contiguous(), positions.contiguous(), theta, rotary_dim)
