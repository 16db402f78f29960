"""Under torch.autocast the matmul ops (v2pe_attention, linear_cross_entropy) cast their floating inputs to the
autocast dtype, as nn.Linear and SDPA do: the result is the explicitly cast call's, and float32 leaves get
float32 gradients."""

from __future__ import annotations

import pytest
import torch

import internvl3_engine as ie
from helpers import backends_for, devices


def autocast_dtype(device: torch.device, kind: str) -> torch.dtype:
    # The Triton interpreter's bfloat16 is broken (triton 3.8): float16 there.
    return torch.float16 if device.type == "cpu" and kind == "triton" else torch.bfloat16


def leaves(*shapes, device):
    return [torch.randn(*shape, device=device, requires_grad=True) for shape in shapes]


def run_both(function, inputs, device, dtype):
    """(output, grads) under autocast on float32 inputs, and with the inputs cast by hand."""
    results = []
    for use_autocast in (True, False):
        tensors = [x.detach().clone().requires_grad_() for x in inputs]
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            out = function(*(tensors if use_autocast else [x.to(dtype) for x in tensors]))
        out.float().square().sum().backward()
        results.append((out, [x.grad for x in tensors]))
    return results


@pytest.mark.parametrize("device", devices(), ids=str)
def test_v2pe_attention_under_autocast(device):
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    positions = ie.v2pe_position_ids(torch.zeros(12, dtype=torch.bool, device=device), cu_seqlens, 1.0)
    for kind in backends_for(device):
        if kind == "cuda":
            continue  # attention has no compiled kernel of its own
        dtype = autocast_dtype(device, kind)
        with ie.backend(kind):
            (out, grads), (expected, expected_grads) = run_both(
                lambda q, k, v: ie.v2pe_attention(q, k, v, cu_seqlens, 7, positions),
                leaves((12, 4, 16), (12, 2, 16), (12, 2, 16), device=device), device, dtype,
            )
        assert out.dtype == dtype and torch.equal(out, expected)
        for grad, reference in zip(grads, expected_grads):
            assert grad.dtype == torch.float32 and torch.equal(grad, reference)


@pytest.mark.parametrize("device", devices(), ids=str)
def test_linear_cross_entropy_under_autocast(device):
    labels = torch.randint(0, 40, (9,), device=device)
    for kind in backends_for(device):
        if kind == "cuda":
            continue  # no compiled kernel of its own
        dtype = autocast_dtype(device, kind)
        with ie.backend(kind):
            (loss, grads), (expected, expected_grads) = run_both(
                lambda hidden, weight: ie.linear_cross_entropy(hidden, weight, labels),
                leaves((9, 16), (40, 16), device=device), device, dtype,
            )
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        for grad, reference in zip(grads, expected_grads):
            assert grad.dtype == torch.float32 and torch.equal(grad, reference)


def test_float64_and_autocast_off_are_left_alone():
    from internvl3_engine.autocast import autocast_inputs

    x64, x32 = torch.randn(2, dtype=torch.float64), torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = autocast_inputs(x64, x32, None, 3)
    assert cast[0] is x64 and cast[1].dtype == torch.bfloat16 and cast[2] is None and cast[3] == 3
    assert autocast_inputs(x32)[0] is x32


def test_meta_tensors_pass_through():
    q = torch.empty(6, 2, 16, device="meta")
    cu_seqlens = torch.tensor([0, 6], dtype=torch.int32, device="meta")
    assert ie.v2pe_attention(q, q, q, cu_seqlens, 6).shape == (6, 2, 16)


def test_torch_compile_fullgraph_under_autocast():
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    head, labels = torch.randn(30, 64), torch.randint(0, 30, (8,))

    def block(q, k, v):
        out = ie.v2pe_attention(q, k, v, cu_seqlens, 5)
        return ie.linear_cross_entropy(out.reshape(8, -1), head, labels)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(q, k, v)
        actual = compiled(q, k, v)
    torch.testing.assert_close(actual, expected)
