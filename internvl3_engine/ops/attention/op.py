"""v2pe_attention: validation, backend dispatch, the torch.library operators, and their autograd."""

from __future__ import annotations

import math

import torch

from ...autocast import autocast_inputs, kernels_at_input_dtype
from ...dispatch import KernelSet
from ...validation import check_cu_seqlens_meta, check_cu_seqlens_values, check_float, check_int, check_length, check_tensor
from ..rotary.op import apply_rotary
from ..library import operator
from .reference import rotated_reference, v2pe_attention_backward_reference, v2pe_attention_reference

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
ROTARY_MODES = ("prerotate_k", "separate")


def keeps_rotated(positions: torch.Tensor | None, rotary_mode: str) -> bool:
    """Whether the forward returns the rotated q and k for the backward to read (see v2pe_attention_op)."""
    return positions is not None and rotary_mode == "prerotate_k"


def _forward_torch(q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode):
    q_rotated, k_rotated = q.new_empty(0), k.new_empty(0)
    if keeps_rotated(positions, rotary_mode):
        # Rotated once, returned and attended (the reference would otherwise rotate them a second time).
        q_rotated, k_rotated = rotated_reference(q, k, positions, theta)
        q, k, positions = q_rotated, k_rotated, None
    out, lse = v2pe_attention_reference(q, k, v, cu_seqlens, positions, theta=theta, causal=causal, softmax_scale=softmax_scale)
    return out, lse.to(torch.float32), q_rotated, k_rotated


def _backward_torch(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode):
    return v2pe_attention_backward_reference(
        grad_out, grad_lse, q, k, v, cu_seqlens, positions, theta=theta, causal=causal, softmax_scale=softmax_scale,
        rotated=keeps_rotated(positions, rotary_mode),
    )


def _forward_triton(*args):
    from .triton_forward import attention_forward_triton  # imported on first use (see KernelSet)

    return attention_forward_triton(*args)


def _backward_triton(*args):
    from .triton_backward import attention_backward_triton

    return attention_backward_triton(*args)


# No compiled (C++/CUDA) kernel: the Triton kernels are the implementation; on CPU, 'auto' runs the reference.
V2PE_ATTENTION = KernelSet(
    "v2pe_attention", torch=_forward_torch, triton=_forward_triton, cuda=None, gpu_order=("triton", "torch")
)
V2PE_ATTENTION_BACKWARD = KernelSet(
    "v2pe_attention_backward", torch=_backward_torch, triton=_backward_triton, cuda=None, gpu_order=("triton", "torch")
)


def _check_pack(cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int) -> None:
    """cu_seqlens contents (one host sync) and max_seqlen >= the longest segment (it sizes the grid)."""
    longest = check_cu_seqlens_values(cu_seqlens, tokens)
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen must be at least the longest segment ({longest}), got {max_seqlen}")


def _attention_fake(q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode):
    out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    if keeps_rotated(positions, rotary_mode):
        return out, lse, torch.empty_like(q), torch.empty_like(k)
    return out, lse, q.new_empty(0), k.new_empty(0)


def _attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@operator("v2pe_attention", fake=_attention_fake)
def v2pe_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor | None,
    theta: float,
    causal: bool,
    softmax_scale: float,
    rotary_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, q_rotated, k_rotated). In 'prerotate_k' mode with positions, q_rotated and k_rotated are q
    and k rotated by the positions (as apply_rotary rotates them), which the kernels compute on the way and
    the backward reads instead of rotating q and k again; otherwise they are empty."""
    _check_pack(cu_seqlens, q.shape[0], max_seqlen)
    return V2PE_ATTENTION.select(q.device)(q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode)


@operator("v2pe_attention_backward", fake=_attention_backward_fake)
def v2pe_attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor | None,
    theta: float,
    causal: bool,
    softmax_scale: float,
    rotary_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): the gradients of the unrotated q and k, and of v. In 'prerotate_k' mode with positions,
    q and k are the forward's q_rotated and k_rotated."""
    return V2PE_ATTENTION_BACKWARD.select(q.device)(
        grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode
    )


class _V2PEAttention(torch.autograd.Function):
    """(out, lse), differentiable in q, k and v through both."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, positions, theta: float, causal: bool, softmax_scale: float,
                rotary_mode: str):
        out, lse, q_rotated, k_rotated = v2pe_attention_op(
            q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode
        )
        if keeps_rotated(positions, rotary_mode):
            q, k = q_rotated, k_rotated  # as much memory as q and k, and the backward need not rotate them again
        ctx.max_seqlen, ctx.theta, ctx.causal, ctx.softmax_scale, ctx.rotary_mode = max_seqlen, theta, causal, softmax_scale, rotary_mode
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, positions)
        ctx.set_materialize_grads(False)  # an unused lse passes None (no zeros to build and read)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens, positions = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = v2pe_attention_backward_op(
            grad_out.contiguous(), None if grad_lse is None else grad_lse.contiguous(), q, k, v, out, lse, cu_seqlens,
            ctx.max_seqlen, positions, ctx.theta, ctx.causal, ctx.softmax_scale, ctx.rotary_mode,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _validated(q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode):
    q, k, v = autocast_inputs(q, k, v)
    check_tensor("q", q, dtypes=ATTENTION_DTYPES, ndim=3)
    for name, x in (("k", k), ("v", v)):
        check_tensor(name, x, ndim=3)
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({_name(q.dtype)}), got {_name(x.dtype)}")
        check_tensor(name, x, device=q.device)
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have the {q.shape[0]} tokens of q, got shape {tuple(x.shape)}")
        if x.shape[2] != q.shape[2]:
            raise ValueError(f"{name} must have the head dim of q ({q.shape[2]}), got shape {tuple(x.shape)}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have the {k.shape[1]} heads of k, got {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"the heads of q ({q.shape[1]}) must be a multiple of the heads of k and v ({k.shape[1]})")
    head_dim = q.shape[2]
    if head_dim % 2 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[2]) must be even and in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    check_cu_seqlens_meta(cu_seqlens, q.device)
    max_seqlen = check_int("max_seqlen", max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be non-negative, got {max_seqlen}")
    if positions is not None:
        check_tensor("positions", positions, dtypes=(torch.float32,), ndim=1, device=q.device)
        check_length("positions", positions, q.shape[0], "one per token of q")
        positions = positions.contiguous()
    theta = check_float("theta", theta, positive=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    softmax_scale = check_float("softmax_scale", softmax_scale, positive=True)
    if not isinstance(rotary_mode, str):
        raise TypeError(f"rotary_mode must be a str, one of {ROTARY_MODES}, got {type(rotary_mode).__name__}")
    if rotary_mode not in ROTARY_MODES:
        raise ValueError(f"rotary_mode must be one of {ROTARY_MODES}, got {rotary_mode!r}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if positions is not None and rotary_mode == "separate":
        # Option (c): the apply_rotary op on q and k (its own autograd rotates the gradients back),
        # then attention without positions.
        q = apply_rotary(q, positions, theta)
        k = apply_rotary(k, positions, theta)
        positions = None
    return q, k, v, cu_seqlens.contiguous(), max_seqlen, positions, theta, causal, softmax_scale, rotary_mode


def v2pe_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor | None = None,
    *,
    theta: float = 1e6,
    causal: bool = True,
    softmax_scale: float | None = None,
    rotary_mode: str = "separate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """v2pe_attention that also returns lse, float32 [Hq, T]: the natural log of each row's sum of
    exp(softmax_scale * q.k) over the keys it attends to. Every row attends at least to itself, so lse is
    finite (a row with no visible key would get out = 0 and lse = -inf; cu_seqlens admits none).
    Differentiable in both outputs."""
    arguments = _validated(q, k, v, cu_seqlens, max_seqlen, positions, theta, causal, softmax_scale, rotary_mode)
    with kernels_at_input_dtype(arguments[0].device):
        return _V2PEAttention.apply(*arguments)


def v2pe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    positions: torch.Tensor | None = None,
    *,
    theta: float = 1e6,
    causal: bool = True,
    softmax_scale: float | None = None,
    rotary_mode: str = "separate",
) -> torch.Tensor:
    """Variable-length attention with V2PE rotary and GQA, fused in Triton (FlashAttention-2 manner).

    q [T, Hq, D], k and v [T, Hk, D] of one dtype (float16, bfloat16, float32) on one device; Hq a multiple
    of Hk (q head h reads kv head h // (Hq / Hk)); D even, 16 to 256 (64 and 128 are the tuned sizes).
    ``cu_seqlens`` int32 [B+1] splits the T tokens into segments; attention never crosses a segment, and
    ``causal`` masks later tokens within one (the LLM; causal=False for the ViT). ``max_seqlen``, a host
    int at least the longest segment, sizes the kernel grid (compute it once per batch on the host).

    ``positions`` (float32 [T], V2PE positions) applies Qwen2's half-split rotary (inv_freq =
    theta^(-2i/D), angles in float32) to q and k: the result equals apply_rotary on q and k followed by
    attention without positions. None: no rotary (the ViT). Positions take no gradient.
    ``softmax_scale`` defaults to 1/sqrt(D).

    ``rotary_mode`` chooses how the rotary is applied, both with the same result:
      'separate' (default): apply_rotary on q and k, then attention without positions (apply_rotary's
          backward rotates dq and dk back); measured faster than 'prerotate_k' on an H100 (see
          bench/results/README.md);
      'prerotate_k': k rotated once by the apply_rotary kernel, q rotated in the attention kernel's
          prologue; the rotated q and k are kept for the backward instead of q and k (the same memory),
          so the backward rotates nothing but the gradients, in its epilogues (by -angle).
    Anything else raises ValueError.

    Under torch.autocast, q, k and v are cast to the autocast dtype first (as SDPA's are).

    Differentiable in q, k and v. Backends: Triton on CUDA; on CPU the PyTorch reference ('auto'), or
    the Triton kernels under TRITON_INTERPRET=1 with backend 'triton'.
    """
    out, _ = v2pe_attention_with_lse(
        q, k, v, cu_seqlens, max_seqlen, positions,
        theta=theta, causal=causal, softmax_scale=softmax_scale, rotary_mode=rotary_mode,
    )
    return out
