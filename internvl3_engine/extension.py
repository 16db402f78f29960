"""The compiled extension ``internvl3_engine._C`` (optional: the package works without it): its loading, how it
was built, and every compiled operator the Python side calls, one function each (see the end of the file).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from internvl3_engine import _C  # noqa: F401  (registers the torch.ops.internvl3_engine_C operators)
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    return _C, None


def extension_available() -> bool:
    """True when ``internvl3_engine._C`` imported: its C++ CPU kernels are usable."""
    return _load()[0] is not None


def extension_has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    module = _load()[0]
    return module is not None and module.compiled_with_cuda()


def extension_cuda_archs() -> list[str]:
    module = _load()[0]
    if module is None or not module.compiled_with_cuda():
        return []
    return [arch for arch in module.cuda_archs().replace(" ", ";").split(";") if arch]


def extension_load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    return _load()[1]


def _operators():
    """The namespace torch.ops.internvl3_engine_C, whose operators the extension registers when it loads
    (RuntimeError saying why when it did not)."""
    if not extension_available():
        raise RuntimeError(f"internvl3_engine._C is not available: {extension_load_error()}")
    return torch.ops.internvl3_engine_C


# ---- The compiled operators (schemas: m.def in csrc/<op>/<op>_cpu.cpp; CPU kernels there, CUDA kernels in
# <op>_cuda.cu). Each function looks its operator up when called, so importing the package never needs the
# extension. The arguments are those of the op's 'torch' and 'triton' implementations (ops/<op>/op.py's
# KernelSet), but for loss_weights' mode, an integer code.


def v2pe_positions(is_visual, cu_seqlens, delta_per_image, delta_scalar):
    """float32 [T] V2PE position ids of a pack, restarting per segment: text tokens step by 1, an image's tokens
    by its delta (delta_per_image, float32 [images], or delta_scalar when that is None), rounded up after it."""
    return _operators().v2pe_positions.default(is_visual, cu_seqlens, delta_per_image, delta_scalar)


def loss_weights(labels, cu_seqlens, mode_code: int, ignore_index: int):
    """float32 [T] per-token loss weights; mode_code is MODE_CODES[mode] of ops/loss_weights/reference.py."""
    return _operators().loss_weights.default(labels, cu_seqlens, mode_code, ignore_index)


def rotary(x, positions, inv_freq, inverse: bool):
    """x [T, H, D] with its first 2 * len(inv_freq) dims rotated (Qwen2 half split) by positions * inv_freq,
    by -angle when inverse (the backward)."""
    return _operators().rotary.default(x, positions, inv_freq, inverse)


def pixel_unshuffle(x, factor: int):
    """[N, h, w, C] -> [N, h/factor, w/factor, factor^2 C]."""
    return _operators().pixel_unshuffle.default(x, factor)


def pixel_unshuffle_backward(grad, factor: int):
    """The inverse permutation: [N, h/factor, w/factor, factor^2 C] -> [N, h, w, C]."""
    return _operators().pixel_unshuffle_backward.default(grad, factor)


def pixel_unshuffle_layernorm(x, weight, bias, eps: float, factor: int):
    """(out [N, h w / factor^2, factor^2 C]: pixel_unshuffle then LayerNorm over the last dim, its rows' mean
    and rstd)."""
    return _operators().pixel_unshuffle_layernorm.default(x, weight, bias, eps, factor)


def pixel_unshuffle_layernorm_backward(grad, x, weight, mean, rstd, factor: int):
    """(dx, dweight, dbias) of pixel_unshuffle_layernorm from the forward's mean and rstd."""
    return _operators().pixel_unshuffle_layernorm_backward.default(grad, x, weight, mean, rstd, factor)


def scatter_visual(text, visual, is_visual, visual_before):
    """text [T, C] with the rows where is_visual replaced by visual's rows, in order (visual_before: the
    visual tokens before each token)."""
    return _operators().scatter_visual.default(text, visual, is_visual, visual_before)


def scatter_visual_backward(grad, is_visual, visual_before, num_visual: int):
    """(grad_text: grad with the visual rows zeroed, grad_visual [num_visual, C]: grad's visual rows)."""
    return _operators().scatter_visual_backward.default(grad, is_visual, visual_before, num_visual)
