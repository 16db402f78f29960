"""Plain PyTorch reference of v2pe_attention: the executable spec every backend is tested against."""

from __future__ import annotations

import math

import torch

from ..rotary.reference import rotary_inv_freq, rotary_reference


def rotated_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by ``positions`` (the rotary reference over the whole head dim)."""
    inv_freq = rotary_inv_freq(q.shape[2], theta, q.device)
    return rotary_reference(q, positions, inv_freq), rotary_reference(k, positions, inv_freq)


def _softmax_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale


def _segment_scores(q, k, v, start, end, group, scale, causal, matmul, compute):
    """One segment's heads-first q, k, v in the ``matmul`` dtype (k and v repeated over each GQA group) and
    its scaled scores [Hq, L, L] in ``compute``, -inf where the causal mask hides a key."""
    qs = q[start:end].transpose(0, 1).to(matmul)  # [Hq, L, D]
    ks = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0).to(matmul)
    vs = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0).to(matmul)
    scores = (qs @ ks.transpose(1, 2)).to(compute) * scale
    if causal:
        length = end - start
        visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return qs, ks, vs, scores


def v2pe_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    theta: float = 1e6,
    causal: bool = True,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length attention over the segments of ``cu_seqlens``, one segment at a time.

    q [T, Hq, D], k and v [T, Hk, D]; q head h reads kv head h // (Hq / Hk). With ``positions`` (float32 [T]),
    q and k are first rotated by the rotary reference (Qwen2 half split, rounded back to the input dtype
    as apply_rotary does). Scores scaled by ``softmax_scale`` (default 1/sqrt(D)), masked causally within
    the segment when ``causal``, softmax, times v.

    Returns (out [T, Hq, D] in the input dtype, lse [Hq, T]: the natural log-sum-exp of each row's scaled
    scores). Every row attends at least to itself, so lse is finite. With ``upcast`` (the spec) the scores,
    softmax and products run in float32 (float64 for float64 inputs); ``upcast=False`` keeps the matmuls in
    the input dtype and rounds the probabilities to it before the product with v, as FlashAttention's
    low-precision test baseline does.
    """
    tokens, q_heads, _ = q.shape
    group = q_heads // k.shape[1]
    scale = _softmax_scale(q, softmax_scale)
    if positions is not None:
        q, k = rotated_reference(q, k, positions, theta)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    matmul = compute if upcast else q.dtype
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        _, _, vs, scores = _segment_scores(q, k, v, start, end, group, scale, causal, matmul, compute)
        lses.append(torch.logsumexp(scores, dim=-1))
        probs = torch.softmax(scores, dim=-1).to(matmul)
        outs.append((probs @ vs).transpose(0, 1).to(q.dtype))
    if not outs:
        return torch.empty_like(q), torch.empty(q_heads, tokens, dtype=compute, device=q.device)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def v2pe_attention_backward_reference(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    theta: float = 1e6,
    causal: bool = True,
    softmax_scale: float | None = None,
    rotated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of v2pe_attention_reference, written out (FlashAttention's formulas):
    P = softmax(S), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta) with delta = rowsum(P * dP) - dlse
    (rowsum(P * dP) = rowsum(dO * O), the kernels' form; d lse / dS = P), dQ = scale dS K, dK = scale dS^T Q; GQA sums dK and dV over each kv head's group;
    with positions, dq and dk are rotated back by -angle (the adjoint of the rotation). ``rotated``: q and k
    are given already rotated by the positions (the forward's rotated copies); the gradients are still those
    of the unrotated q and k. Arithmetic in float32 (float64 for float64 inputs), results in the input dtype."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    scale = _softmax_scale(q, softmax_scale)
    if positions is not None and not rotated:
        q, k = rotated_reference(q, k, positions, theta)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(tokens, q_heads, head_dim, dtype=compute, device=q.device)
    dk = torch.zeros(tokens, kv_heads, head_dim, dtype=compute, device=q.device)
    dv = torch.zeros(tokens, kv_heads, head_dim, dtype=compute, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs, scores = _segment_scores(q, k, v, start, end, group, scale, causal, compute, compute)
        dos = grad_out[start:end].transpose(0, 1).to(compute)
        probs = torch.softmax(scores, dim=-1)
        dprobs = dos @ vs.transpose(1, 2)
        delta = (probs * dprobs).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse[:, start:end, None].to(compute)
        dscores = probs * (dprobs - delta)
        dq[start:end] = (dscores @ ks * scale).transpose(0, 1)
        dk[start:end] = (dscores.transpose(1, 2) @ qs * scale).unflatten(0, (kv_heads, group)).sum(1).transpose(0, 1)
        dv[start:end] = (probs.transpose(1, 2) @ dos).unflatten(0, (kv_heads, group)).sum(1).transpose(0, 1)
    if positions is not None:
        inv_freq = rotary_inv_freq(head_dim, theta, q.device)
        dq = rotary_reference(dq, positions, inv_freq, inverse=True)
        dk = rotary_reference(dk, positions, inv_freq, inverse=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
