"""Sweep of the Triton attention kernels' launch configurations (block sizes, warps, pipeline stages).

For each case (the LLM's 7B pack, D = 128, causal, without and with V2PE positions in 'prerotate_k' mode;
the ViT's tiles, D = 64, not causal) and each kernel
(forward, dkdv, dq), every candidate configuration runs through INTERNVL3_ENGINE_ATTENTION_BLOCKS (see
internvl3_engine/ops/attention/blocks.py) while the other kernels keep their defaults. A candidate's time
is its kernel's own: on a GPU the summed device time of that kernel (torch.profiler) per forward+backward,
on a CPU the wall time of the whole forward+backward (the interpreter: a smoke test, not a result). Each
candidate's outputs and gradients are compared with the defaults' (a candidate that disagrees is marked).
Prints a table per case and kernel and, per case, the variable's value selecting the fastest, and writes
the rows as JSON after each case. Every configuration is a Triton compile (10-30 s each, one at a time in
one process): on a GPU, worker processes first run one forward+backward per configuration at once
(``--compile-workers``), which fills Triton's on-disk cache for the timed runs. ``--cases`` runs some of
the cases (a later call on the same machine finds the cache warm).

    python -m bench.attention_blocks [--cases 'LLM 7B,ViT'] [--calls 5] [--compile-workers 16] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

import internvl3_engine as ie
from internvl3_engine.ops.attention.blocks import (
    BLOCKS_ENV_VAR, KERNELS, attention_blocks, check_blocks, padded_head_dim,
)

from internvl3_engine.cli import ArgumentParser

from .attention import Segments, attention_flops, make_attention
from .harness import Timer, device_ms

Config = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, warps, stages
# Agreement with the defaults' results: block sizes change only the order of the float32 accumulations,
# so beyond a few low-precision ulps something is wrong.
AGREEMENT = 2e-2


@dataclass(frozen=True)
class SweepCase:
    name: str
    segments: Segments
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    candidates: dict[str, tuple[Config, ...]]  # per kernel, besides its default
    rotary_mode: str | None = None  # with V2PE positions in this rotary mode; None: no positions


# Hopper-oriented candidates around the defaults: wider tiles with 8 warps, deeper pipelines, and the
# shapes FlashAttention-2's Triton implementations use for D = 64 and 128. Pruned by what ptxas reports for
# sm_90a under triton 3.6 (bench/results/README.md, "Gaps against the targets"): at D = 128 the dK/dV kernel
# holds dK and dV, 64 x 256 float32 per warpgroup, in registers, and most of its shapes spill (the default,
# 32 x 64 with 4 warps, 244 bytes per thread); the spill-free ones, two warpgroups over 16-query blocks, or
# one pipeline stage, are here beside the least-spilling others.
_LLM_CANDIDATES = {
    "forward": ((128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (64, 32, 4, 4)),
    "dkdv": ((16, 64, 8, 2), (16, 128, 8, 2), (32, 64, 8, 1), (32, 32, 4, 2), (32, 64, 8, 2), (32, 128, 8, 2),
             (16, 64, 4, 2), (64, 64, 8, 2)),
    "dq": ((128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (64, 16, 4, 2)),
}
# The LLM also with positions in 'prerotate_k' mode, whose kernels rotate q in the forward's prologue and
# dq, dk in the backward's epilogues (more registers: their best blocks may differ from the plain ones').
CASES = (
    SweepCase("LLM 7B", Segments(16384, 256, 4096), 28, 4, 128, True, _LLM_CANDIDATES),
    SweepCase("LLM 7B prerotate_k", Segments(16384, 256, 4096), 28, 4, 128, True, _LLM_CANDIDATES, "prerotate_k"),
    SweepCase("ViT", Segments(16 * 1025, 1025, 1025), 16, 16, 64, False, {
        "forward": ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)),
        "dkdv": ((32, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 2), (64, 64, 4, 2), (16, 128, 4, 2)),
        "dq": ((128, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 128, 8, 2)),
    }),
)
# Kernel names as the profiler lists them (Triton names a kernel after its function).
_KERNEL_FUNCTIONS = {"forward": "_forward_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}
WORK = {"forward": 1.0, "dkdv": 2.0, "dq": 1.5}  # FLOPs per kernel as multiples of the forward's


def override_entry(kernel: str, head_dim: int, config: Config) -> str:
    """One INTERNVL3_ENGINE_ATTENTION_BLOCKS entry: ``config`` for ``kernel`` at ``head_dim``."""
    return f"{kernel}@{padded_head_dim(head_dim)}={','.join(map(str, config))}"


@contextmanager
def blocks_override(value: str) -> Iterator[None]:
    previous = os.environ.get(BLOCKS_ENV_VAR)
    os.environ[BLOCKS_ENV_VAR] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[BLOCKS_ENV_VAR]
        else:
            os.environ[BLOCKS_ENV_VAR] = previous


def _forward_backward(inputs, case: SweepCase):
    q, k, v, cu_seqlens, max_seqlen, positions = inputs
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with ie.backend("triton"):
        out = ie.v2pe_attention(*leaves, cu_seqlens, max_seqlen, positions, causal=case.causal,
                                rotary_mode=case.rotary_mode or "separate")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return (out.detach(), *grads)


def _kernel_ms(kernel: str, inputs, case: SweepCase, calls: int) -> float:
    """Milliseconds per forward+backward of ``kernel`` alone (GPU, profiler), or of the whole call (CPU)."""
    device = inputs[0].device
    call = lambda: _forward_backward(inputs, case)  # noqa: E731
    if device.type == "cuda":
        return device_ms(device, call, calls, kernel=_KERNEL_FUNCTIONS[kernel])
    return Timer(device, quick=True).median_ms(call)


def _disagreement(results, expected) -> float:
    """Largest |result - expected| relative to max |expected| over the output and the three gradients."""
    return max(float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))
               for got, want in zip(results, expected))


def _inputs(case: SweepCase, device: torch.device, dtype: torch.dtype):
    """The case's random inputs, the same in every process (so that every process compiles the same
    specialisations of the kernels)."""
    generator = torch.Generator(device=device).manual_seed(0)
    return make_attention(device, dtype, generator, case.segments, case.heads, case.kv_heads, case.head_dim,
                          case.rotary_mode is not None)


def _jobs(case: SweepCase, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Config]]:
    """(kernel, configuration) in sweep order: per kernel its default, then the case's candidates."""
    return [(kernel, config) for kernel in KERNELS
            for config in (attention_blocks(kernel, case.head_dim, dtype, device), *case.candidates[kernel])]


def compile_one(case: SweepCase, kernel: str, config: Config, device: str, dtype: torch.dtype) -> bool:
    """One forward+backward of ``case`` with ``kernel`` at ``config``, which compiles that configuration into
    Triton's cache. False if it failed: a configuration the compiler or the GPU cannot run, which the timed
    run meets again and records in its row."""
    with blocks_override(override_entry(kernel, case.head_dim, config)):
        try:
            _forward_backward(_inputs(case, torch.device(device), dtype), case)
        except Exception:  # recorded by the timed run
            return False
    return True


def precompile(case: SweepCase, device: torch.device, dtype: torch.dtype, workers: int) -> list[bool]:
    """Compiles every configuration of ``case`` in ``workers`` processes at once (spawned: each makes its own
    CUDA context), so that the sweep's runs load them from Triton's on-disk cache. Returns compile_one's
    result per configuration, in sweep order."""
    jobs = _jobs(case, device, dtype)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(compile_one, case, kernel, config, str(device), dtype) for kernel, config in jobs]
        return [future.result() for future in tqdm(futures, desc=f"{case.name}: compiling")]


def sweep(case: SweepCase, device: torch.device, dtype: torch.dtype, calls: int, progress=iter) -> list[dict]:
    """One row per (kernel, configuration): the default first, then the case's candidates."""
    inputs = _inputs(case, device, dtype)
    forward_flops, _ = attention_flops(inputs, causal=case.causal)
    expected = _forward_backward(inputs, case)
    jobs = _jobs(case, device, dtype)
    rows = []
    for index, (kernel, config) in enumerate(progress(jobs)):
        check_blocks(kernel, *config)
        row = {"case": case.name, "head_dim": case.head_dim, "kernel": kernel, "config": list(config),
               "default": index == 0 or jobs[index - 1][0] != kernel}
        with blocks_override(override_entry(kernel, case.head_dim, config)):
            try:
                row["disagreement"] = _disagreement(_forward_backward(inputs, case), expected)
                row["ms"] = _kernel_ms(kernel, inputs, case, calls)
            except Exception as error:  # a configuration the compiler or the GPU cannot run (shared memory)
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if "ms" in row and device.type == "cuda":
            # The work each kernel does, in units of the forward's two matmuls: dkdv recomputes the scores
            # and computes dP, dV and dK (4 matmuls), dq recomputes the scores and dP and computes dQ (3).
            row["tflop_per_s"] = WORK[kernel] * forward_flops / (row["ms"] * 1e-3) / 1e12
        rows.append(row)
    return rows


def fastest(rows: list[dict]) -> dict[str, dict]:
    """{kernel: the fastest of ``rows`` (one case's) that agreed with the defaults}."""
    best = {}
    for row in rows:
        if "ms" not in row or row["disagreement"] > AGREEMENT:
            continue
        if row["kernel"] not in best or row["ms"] < best[row["kernel"]]["ms"]:
            best[row["kernel"]] = row
    return best


def override_value(rows: list[dict]) -> str:
    """The INTERNVL3_ENGINE_ATTENTION_BLOCKS value selecting the fastest configurations of one case's rows."""
    best = sorted(fastest(rows).items())
    return ";".join(override_entry(kernel, row["head_dim"], row["config"]) for kernel, row in best)


def markdown(rows: list[dict]) -> str:
    lines = ["| case | kernel | BLOCK_M, BLOCK_N, warps, stages | ms per fwd+bwd | TFLOP/s (work done) | note |",
             "|---|---|---|---:|---:|---|"]
    for row in rows:
        note = "default" if row["default"] else ""
        if "error" in row:
            note = row["error"]
        elif row["disagreement"] > AGREEMENT:
            note = f"disagrees with the defaults ({row['disagreement']:.2e})"
        time_ms = f"{row['ms']:.3f}" if "ms" in row else "-"
        rate = f"{row['tflop_per_s']:.1f}" if "tflop_per_s" in row else "-"
        lines.append(f"| {row['case']} | {row['kernel']} | {', '.join(map(str, row['config']))} | {time_ms} | {rate} | {note} |")
    return "\n".join(lines)


def _case_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [case.name for case in CASES]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown or text!r}: choose among {known}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.attention_blocks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=_case_names, default=[case.name for case in CASES],
                        help="comma-separated cases to sweep (default: all: " + ", ".join(case.name for case in CASES) + ")")
    parser.add_argument("--calls", type=int, default=5, help="forward+backward calls timed per candidate")
    parser.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling the configurations before the timed runs (default: the CPUs, at "
                        "most 16; 1: compile as the sweep reaches each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for attention_blocks_<case>.json, one per case, each written as its case ends")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.attention_blocks: no CUDA device; the sweep times GPU kernels (its tests run it on the CPU)")
        return 2
    device = torch.device("cuda")
    for case in (case for case in CASES if case.name in args.cases):
        if args.compile_workers > 1:
            precompile(case, device, torch.bfloat16, args.compile_workers)
        rows = sweep(case, device, torch.bfloat16, args.calls, lambda jobs: tqdm(jobs, desc=case.name))
        value = override_value(rows)
        print(markdown(rows))
        # One value per case: the LLM's cases share a head dim, so a value serves the rotary mode it was timed in.
        print(f"{case.name}: {BLOCKS_ENV_VAR}={value}", flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            record = {"device": torch.cuda.get_device_name(device), "versions": ie.info(), "case": case.name,
                      "rows": rows, "value": value}
            slug = case.name.lower().replace(" ", "_")
            (args.out / f"attention_blocks_{slug}.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
