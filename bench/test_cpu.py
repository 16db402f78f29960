"""pytest-benchmark cases of what runs on a CPU: every public op on its CPU backends ('torch', the PyTorch
reference, and 'cuda', the compiled C++ kernels, where the op has them) forward and forward+backward at
moderate sizes, and the tiny training step (model.InternVL3 on each backend, transformers' InternVL on the
padded batch as the baseline). Every case also checks its result against the reference, so it is a test too.
Triton is left out: on a CPU it runs in its interpreter, which is not a benchmark.

    pytest bench/test_cpu.py --benchmark-only --benchmark-group-by=group   # time; compare backends per group
    pytest bench/test_cpu.py --benchmark-disable                           # each case once, untimed (CI)
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import nullcontext

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import internvl3_engine  # noqa: E402
import internvl3_engine.ops  # noqa: E402
from internvl3_engine.dispatch import KernelSet, why_unusable  # noqa: E402

from bench import attention, kernels, train  # noqa: E402
from bench.harness import Case, engine  # noqa: E402

CPU = torch.device("cpu")
DTYPE = torch.float32
# Float32 backends differ from the reference in the order they accumulate.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)

# Sizes a CPU computes in milliseconds: large enough that the kernels' loops, not Python, take the time.
CASES = [
    *kernels.memory_bound_cases(tokens=4096, heads=8, head_dim=64, tiles_and_channels=((4, 256),), side=32,
                                channels=512, images=4, image_tokens=256, segments=16),
    Case(kernels.V2PE_ATTENTION, dict(segments=attention.Segments(1024, 64, 256), heads=4, kv_heads=2,
                                              head_dim=64, positions=True), dict(causal=True), name="LLM"),
    Case(kernels.LINEAR_CROSS_ENTROPY, dict(tokens=512, hidden=256, vocab=8192), name="head"),
]


def _kernel_sets() -> dict[str, KernelSet]:
    """Every KernelSet in internvl3_engine.ops by op name: which backends each op really has."""
    found = {}
    for module in pkgutil.walk_packages(internvl3_engine.ops.__path__, "internvl3_engine.ops."):
        if module.name.endswith(".op"):
            found.update({value.name: value for value in vars(importlib.import_module(module.name)).values()
                          if isinstance(value, KernelSet)})
    return found


KERNEL_SETS = _kernel_sets()


def _jobs() -> list:
    """(case, direction, backend) for every case, direction and CPU backend of the case's op."""
    jobs = []
    for case in CASES:
        backends = ["torch"] + (["cuda"] if KERNEL_SETS[case.spec.name].cuda is not None else [])
        directions = (kernels.FORWARD, kernels.FORWARD_BACKWARD) if case.spec.differentiable else (kernels.FORWARD,)
        jobs += [pytest.param(case, direction, backend, id=f"{case.spec.name}-{direction}-{backend}")
                 for direction in directions for backend in backends]
    return jobs


def _skip_unless_usable(backend: str | None) -> None:
    reason = None if backend is None else why_unusable(backend, CPU)
    if reason is not None:
        pytest.skip(reason)


def test_every_public_op_has_a_case():
    assert {case.spec.name for case in CASES} == {spec.name for spec in kernels.OPS}


@pytest.mark.parametrize("case, direction, backend", _jobs())
def test_op(benchmark, case: Case, direction: str, backend: str):
    _skip_unless_usable(backend)
    spec = case.spec
    args = spec.make(CPU, DTYPE, torch.Generator().manual_seed(0), **case.params)
    timed, reference = engine(spec.name, backend), engine(spec.name, "torch")

    def run(implementation):
        call = lambda args, context: implementation.call(context, *args, **case.options)  # noqa: E731
        if direction == kernels.FORWARD:
            return lambda: call(args, None)
        inputs = kernels.with_grad(spec, args)
        grads = tuple(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
                      for o in kernels.as_tuple(call(inputs, None)))
        return lambda: kernels.forward_backward(call, spec, inputs, None, grads)

    with reference.selected():
        expected = run(reference)()
    benchmark.group = f"{spec.name} {direction}: {case.label}"
    benchmark.extra_info.update(op=spec.name, direction=direction, backend=backend, case=case.label)
    with timed.selected():
        actual = benchmark(run(timed))
    for got, want in zip(kernels.as_tuple(actual), kernels.as_tuple(expected), strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("implementation, backend", [
    (train.ENGINE_IMPLEMENTATION, "torch"),
    (train.ENGINE_IMPLEMENTATION, "cuda"),
    (train.TRANSFORMERS_IMPLEMENTATION, None),
])
def test_tiny_training_step(benchmark, implementation: str, backend: str | None):
    """The first step's loss is the reference's (model.InternVL3 on the 'torch' backend, same weights)."""
    _skip_unless_usable(backend)
    from model import InternVL3, InternVL3Config

    config = InternVL3Config.preset("tiny")
    case = train.SIZES["tiny"][0]
    batch = train.make_batch(config, case, CPU, DTYPE, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = InternVL3(config)
    with internvl3_engine.backend("torch"), torch.no_grad():
        expected = train.engine_loss(ours, batch)()
    if implementation == train.ENGINE_IMPLEMENTATION:
        step = train.training_step(ours, train.engine_loss(ours, batch))
    else:
        pytest.importorskip("transformers")
        theirs = train.transformers_model(config, CPU, DTYPE, weights_of=ours)
        step = train.training_step(theirs, train.transformers_loss(theirs, train.padded_batch(batch)))
    benchmark.group = f"training step: {case.label}"
    benchmark.extra_info.update(implementation=implementation, backend=backend, tokens=case.tokens)
    with nullcontext() if backend is None else internvl3_engine.backend(backend):
        first = step()
        benchmark(step)
    torch.testing.assert_close(first, expected, **TOLERANCE)
