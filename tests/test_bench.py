"""Smoke test of the benchmark harness: the tiny kernels suite on CPU, in-process. No assertions on speed."""

from __future__ import annotations

import json

import torch

import internvl3_engine
from bench import kernels
from bench.__main__ import main


def test_tiny_kernels_suite_writes_a_complete_record(tmp_path):
    exit_code = main(["--suite", "kernels", "--sizes", "tiny", "--device", "cpu", "--out", str(tmp_path)])

    (record_path,) = tmp_path.glob("*_kernels-tiny.json")
    record = json.loads(record_path.read_text())
    assert record_path.with_suffix(".md").stat().st_size > 0
    assert record_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")

    assert record["ceilings"]["copy"]["gb_per_s"] > 0
    assert record["ceilings"]["matmul"]["tflop_per_s"] > 0
    assert record["device"]["type"] == "cpu" and record["versions"]["internvl3_engine"]["version"]

    rows = record["results"]
    assert {row["op"] for row in rows} == {spec.name for spec in kernels.OPS}
    for row in rows:
        assert row["status"] in ("ok", "skipped", "error")
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and row["bytes"] > 0 and row["gb_per_s"] > 0, row
        else:
            assert row["reason"], row
    # The PyTorch baseline runs every op the package exports, in every direction.
    for row in rows:
        if row["backend"] == "torch" and hasattr(internvl3_engine, row["op"]):
            assert row["status"] == "ok", row
    differentiable = {spec.name for spec in kernels.OPS if spec.differentiable}
    assert {row["op"] for row in rows if row["direction"] == kernels.FORWARD_BACKWARD} == differentiable
    # A broken op is recorded and fails the run.
    assert exit_code == (1 if any(row["status"] == "error" for row in rows) else 0)


def test_bytes_moved_formulas():
    generator = torch.Generator().manual_seed(0)
    args = kernels.ROTARY.make(torch.device("cpu"), torch.float32, generator, tokens=8, heads=2, head_dim=4)
    forward, backward = kernels.ROTARY.bytes_moved(args)
    assert forward == backward == 2 * (8 * 2 * 4) * 4 + 8 * 4 + 2 * 4  # x in and out, positions, inv_freq

    text, visual, is_visual = args = kernels.SCATTER_VISUAL.make(
        torch.device("cpu"), torch.float16, generator, tokens=32, channels=4, images=2, image_tokens=4
    )
    assert int(is_visual.sum()) == visual.shape[0] == 8
    forward, backward = kernels.SCATTER_VISUAL.bytes_moved(args)
    assert forward == 2 * (32 * 4) * 2 + 32  # kept text rows + visual rows in, every row out, the mask
    assert backward == 2 * (32 * 4) * 2 + (8 * 4) * 2 + 32  # grad in, grad_text and grad_visual out, the mask
