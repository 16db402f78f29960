"""Backend selection: which implementation of an op runs.

Backends:
  'torch'  the plain PyTorch references (the executable specs);
  'triton' the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  'cuda'   the compiled extension: its CUDA kernels on CUDA tensors, its C++ kernels on CPU tensors;
  'auto'   (default) the best available for the tensors' device: on CUDA each op's preferred order
           (see ``KernelSet.gpu_order``), on CPU the C++ kernels when built, else the references.

The choice comes from, in order: the innermost ``with backend(name)``, ``set_backend(name)``, the
environment variable INTERNVL3_ENGINE_BACKEND, and 'auto'. The choice is process-wide, like the
torch.backends flags, not per thread: the autograd engine runs CUDA backward passes on its own threads,
and they must see the backend the forward ran under. An explicitly chosen backend that cannot run
an op on the given device raises RuntimeError saying why; an op that by design has no kernel of the chosen
kind (say, no Triton kernel) runs what 'auto' would choose.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .extension import extension_available, extension_has_cuda, extension_load_error

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "INTERNVL3_ENGINE_BACKEND"

_context_backends: list[str] = []  # the stack of enclosing `with backend(...)` blocks
_global_backend: str | None = None


def _checked(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str, one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide backend ('auto', 'torch', 'triton', 'cuda'); None restores the default."""
    global _global_backend
    _global_backend = None if name is None else _checked(name, "name")


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the ops inside the ``with`` block on backend ``name``."""
    _context_backends.append(_checked(name, "name"))
    try:
        yield name
    finally:
        _context_backends.pop()


def get_backend() -> str:
    """The backend now requested (before per-op resolution)."""
    chosen = _context_backends[-1] if _context_backends else _global_backend
    if chosen is not None:
        return chosen
    return _environment_backend(os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=16)
def _environment_backend(value: str | None) -> str:
    # Read on every call (the variable may change at run time), parsed once per distinct value: every op
    # call asks, and host time per call is what bounds the short memory-bound kernels.
    return _checked((value or "").strip().lower() or "auto", ENV_VAR)


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # triton raises assorted errors on unsupported platforms
        return f"{type(error).__name__}: {error}"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@functools.lru_cache(maxsize=None)
def triton_interpreter_error() -> str | None:
    """Why Triton's interpreter cannot run the engine's kernels here (None when it can). Before triton 3.7
    the interpreter turns a loaded scalar (a 1-element array) into a Python int for loop bounds, which
    numpy 2.4 refuses: every kernel looping over a segment read from cu_seqlens fails."""
    import numpy
    import triton

    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} fails with numpy {numpy.__version__} (fixed in triton "
                "3.7): install numpy<2.4 to run Triton kernels on CPU tensors")
    return None


def why_unusable(kind: str, device: torch.device) -> str | None:
    """Why backend ``kind`` cannot run on ``device`` (None when it can)."""
    if kind == "torch":
        return None
    if kind == "triton":
        error = triton_import_error()
        if error is not None:
            return f"triton is not importable ({error})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return triton_interpreter_error()
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type} tensors"
    if kind == "cuda":
        if not extension_available():
            return f"the compiled extension did not load ({extension_load_error()})"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            return None if extension_has_cuda() else "the extension was built without CUDA (a CPU-only build)"
        return f"no compiled kernels for {device.type} tensors"
    raise ValueError(f"unknown backend {kind!r}")


@dataclass(frozen=True)
class KernelSet:
    """The implementations of one op: a reference and, where they exist, Triton and compiled kernels.

    Each implementation takes the same arguments. ``gpu_order`` is the preference 'auto' follows on CUDA
    tensors (measured per op; see bench/). The compiled kernels are the functions of extension.py (each
    looks its operator up when called). The Triton ones are functions of the op's op.py that import their
    kernel module when called: a Triton module imports triton and reads TRITON_INTERPRET when imported,
    which must wait until a Triton kernel is used (importing the package imports no Triton module).
    """

    name: str
    torch: Callable
    triton: Callable | None = None
    cuda: Callable | None = None
    # Compiled kernels first: measured on an H100 (see bench/results/README.md), they beat the Triton kernels
    # of every memory-bound op forward+backward (rotary, both unshuffles, scatter_visual) and of loss_weights,
    # where short kernels make the host's time per call count (a C++ op launches with less of it than
    # Triton's Python launcher). Ops whose kernels are only Triton say so.
    gpu_order: tuple[str, ...] = ("cuda", "triton", "torch")

    def select(self, device: torch.device) -> Callable:
        requested = get_backend()
        if requested == "torch":
            return self.torch
        if requested != "auto" and getattr(self, requested) is not None:
            reason = why_unusable(requested, device)
            if reason is not None:
                raise RuntimeError(f"backend {requested!r} cannot run {self.name} on {device.type} tensors: {reason}")
            return getattr(self, requested)
        order = self.gpu_order if device.type == "cuda" else ("cuda", "torch")
        for kind in order:
            implementation = getattr(self, kind)
            if implementation is not None and why_unusable(kind, device) is None:
                return implementation
        return self.torch

    def chosen(self, device: torch.device) -> str:
        """Name of the backend ``select`` picks for ``device`` now."""
        implementation = self.select(device)
        return next(kind for kind in ("torch", "triton", "cuda") if getattr(self, kind) is implementation)
