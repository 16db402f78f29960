"""Plain PyTorch references of pixel_unshuffle and pixel_unshuffle_layernorm: the executable specs.

pixel_unshuffle is InternVL's ``pixel_shuffle(x, scale_factor)`` with ps_version 'v2' (transformers'
``InternVLModel.pixel_shuffle`` computes the same), written literally as its views and permutes. With
r = 1 / scale_factor its closed form, which the kernels implement, is

    out[n, i, j, k] = x[n, r*i + k // (r*C), r*j + (k % (r*C)) // C, k % C]

so an output row (n, i, j) is r contiguous chunks of r*C elements of x: chunk q is x[n, r*i + q, r*j : r*j + r, :].
This channel order is not torch.nn.functional.pixel_unshuffle's.
"""

from __future__ import annotations

import torch


def pixel_unshuffle_reference(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x [n, A, B, c] -> [n, A/r, B/r, r*r*c] with r = ``factor``: InternVL's rule with s = 1/r."""
    n, a, b, c = x.shape
    r = factor
    # view [n, A, B*s, c/s] -> permute(0, 2, 1, 3) -> view [n, B*s, A*s, c/(s*s)] -> permute(0, 2, 1, 3)
    x = x.reshape(n, a, b // r, c * r)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, b // r, a // r, c * r * r)
    # clone, not contiguous(): a fresh tensor even where the permutes are trivial (r = 1, empty x)
    return x.permute(0, 2, 1, 3).clone(memory_format=torch.contiguous_format)


def pixel_unshuffle_backward_reference(grad: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse permutation: grad [n, A/r, B/r, r*r*c] -> [n, A, B, c], undoing each step of the forward."""
    n, a_r, b_r, k = grad.shape
    r = factor
    c = k // (r * r)
    grad = grad.permute(0, 2, 1, 3).contiguous()
    grad = grad.view(n, b_r, a_r * r, c * r)
    grad = grad.permute(0, 2, 1, 3).clone(memory_format=torch.contiguous_format)
    return grad.view(n, a_r * r, b_r * r, c)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pixel_unshuffle_layernorm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, factor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of pixel_unshuffle(x): (out [N, A*B/r^2, r^2 C] in x.dtype, mean, rstd).

    mean and rstd are per output row, flat [N*A*B/r^2], in the statistics dtype (float32, or float64
    for float64 x); the variance is the biased one, as torch.nn.LayerNorm's.
    """
    compute = stats_dtype(x.dtype)
    rows = pixel_unshuffle_reference(x, factor)
    n, a_r, b_r, width = rows.shape
    xf = rows.reshape(-1, width).to(compute)
    mean = xf.mean(dim=1)
    centered = xf - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(dim=1) + eps)
    out = centered * rstd[:, None] * weight.to(compute) + bias.to(compute)
    return out.to(x.dtype).view(n, a_r * b_r, width), mean, rstd


def pixel_unshuffle_layernorm_backward_reference(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x.dtype, dweight, dbias in weight.dtype) from grad [N, A*B/r^2, r^2 C] and the saved statistics.

    dx_row = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), scattered back through the inverse
    permutation; dweight = sum over rows of g*xhat, dbias = sum over rows of g (accumulated in float32,
    or float64 for float64 x).
    """
    compute = mean.dtype
    rows = pixel_unshuffle_reference(x, factor)
    width = rows.shape[-1]
    xhat = (rows.reshape(-1, width).to(compute) - mean[:, None]) * rstd[:, None]
    g = grad.reshape(-1, width).to(compute)
    gw = g * weight.to(compute)
    dx_rows = rstd[:, None] * (gw - gw.mean(dim=1, keepdim=True) - xhat * (gw * xhat).mean(dim=1, keepdim=True))
    dx = pixel_unshuffle_backward_reference(dx_rows.to(x.dtype).view(rows.shape), factor)
    dweight = (g * xhat).sum(dim=0).to(weight.dtype)
    dbias = g.sum(dim=0).to(weight.dtype)
    return dx, dweight, dbias
