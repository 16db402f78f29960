"""Registration of the engine's operators with torch's dispatcher.

Each operator is defined with ``torch.library`` (its schema inferred from the implementation's type hints),
with one implementation for every device (CompositeExplicitAutograd: the implementation picks the backend
itself, see ``dispatch.KernelSet``) and a fake implementation for tracing (torch.compile, opcheck).

Autograd lives outside the operators, in a ``torch.autograd.Function`` per differentiable op (in the op's
``op.py``) whose forward and backward call the forward and backward operators. That is the low-overhead
arrangement: ``torch.library.custom_op`` with ``register_autograd`` passes every call through several
Python layers (safety checks, a generated autograd.Function, redispatches): a forward+backward through
them measured slower in host time than this arrangement (on the CPU with tiny tensors, where nothing else
counts; see bench/results/README.md). Host time matters because at InternVL3's sizes the memory-bound kernels
run for only tens of microseconds. The operators themselves are therefore not differentiable; the public
functions (``internvl3_engine.pixel_unshuffle`` and the others) are.
"""

from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "internvl3_engine"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def operator(name: str, fake: Callable) -> Callable[[Callable], torch._ops.OpOverload]:
    """Decorator: defines ``internvl3_engine::name`` with the decorated function's schema (no argument is
    mutated) and the function as its implementation on every device, registers ``fake`` as its fake
    implementation, and returns the operator (``torch.ops.internvl3_engine.<name>.default``)."""

    def register(implementation: Callable) -> torch._ops.OpOverload:
        _LIBRARY.define(torch.library.infer_schema(implementation, mutates_args=(), op_name=name))
        _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
        return getattr(getattr(torch.ops, NAMESPACE), name).default

    return register
