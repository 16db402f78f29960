"""Loading of the compiled extension ``internvl3_engine._C`` (optional: the package works without it)."""

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


def kernel(name: str):
    """The compiled operator ``torch.ops.internvl3_engine_C.<name>``."""
    if not extension_available():
        raise RuntimeError(f"internvl3_engine._C is not available: {extension_load_error()}")
    return getattr(torch.ops.internvl3_engine_C, name)


def compiled(name: str):
    """A function calling the compiled operator ``name``, looked up on its first call (so that importing the
    package never needs the extension) and remembered."""
    resolve = functools.cache(lambda: kernel(name).default)

    def run(*args):
        return resolve()(*args)

    run.__name__ = run.__qualname__ = f"compiled_{name}"
    return run
