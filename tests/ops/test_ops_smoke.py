"""scripts/ops_smoke.py (compute-sanitizer's workload on a GPU) runs every op on every backend present."""

from __future__ import annotations

import os
import subprocess
import sys

import internvl3_engine as ie

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "ops_smoke.py")


def test_ops_smoke_runs_every_public_op_on_cpu():
    result = subprocess.run([sys.executable, SCRIPT, "--device", "cpu"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ops = {name for name in ie.__all__ if f" {name}: ok" in result.stdout or f" {name}[" in result.stdout}
    expected = {"v2pe_position_ids", "loss_weights", "apply_rotary", "pixel_unshuffle", "pixel_unshuffle_layernorm",
                "scatter_visual", "v2pe_attention", "linear_cross_entropy"}
    assert expected <= ops
    assert result.stdout.count(": ok") >= 2 * len(expected)  # the reference and at least one other backend
