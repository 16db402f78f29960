"""``python -m internvl3_engine.planner``: recommend a parallelism plan for training an InternVL model.

    python -m internvl3_engine.planner --preset internvl3-78b --gpus 256 --gpu h100
    python -m internvl3_engine.planner --config path/to/config.json --gpus 64 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..cli import ArgumentParser, run_command
from ..parallel.plan import COMPONENTS, ParallelPlan
from .calibration import calibrate, default_results_dir
from .cost import Assumptions, PlanCost, Workload
from .hardware import GIB, GPUS, GPU, gpu as gpu_kind
from ..architectures import PRESETS
from .search import PREDICTION_MARGIN, Recommendation, recommend
from .shape import ModelShape, model_shape


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m internvl3_engine.planner",
        description="Recommend a parallelism plan (per-component sharding, activation checkpointing, tensor "
        "parallelism, HSDP) for training an InternVL model, with memory per GPU and a predicted step time "
        "from a cost model whose assumptions are printed with the result.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="internvl3-8b", help="a published InternVL3 (default internvl3-8b)")
    source.add_argument("--config", type=Path, help="a transformers InternVL config.json (or its folder) instead of a preset")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (a multiple of 8 beyond one node; default 8)")
    parser.add_argument("--gpu", choices=tuple(GPUS), default="h100", help="GPU kind (default h100)")
    defaults = Workload()
    parser.add_argument("--tokens-per-pack", type=int, default=defaults.tokens_per_pack,
                        help="packed tokens a data-parallel rank trains on per micro-batch; tensor-parallel peers share "
                        f"one pack (default {defaults.tokens_per_pack})")
    parser.add_argument("--tiles-per-pack", type=int, default=defaults.tiles_per_pack,
                        help=f"image tiles in a pack (default {defaults.tiles_per_pack})")
    parser.add_argument("--micro-batches", type=int, default=defaults.micro_batches,
                        help=f"packs per rank and optimizer step: gradient accumulation (default {defaults.micro_batches})")
    parser.add_argument("--sample-length", type=int, default=defaults.sample_length,
                        help=f"mean sample length in a pack, for attention's FLOPs (default {defaults.sample_length})")
    parser.add_argument("--reference-model", action="store_true",
                        help="MPO with a reference model (model.train --mode mpo on pairs without precomputed reference "
                        "log-probabilities): count its zero3 shards and its no-grad forward on every pack")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="compute efficiency (achieved / peak FLOP/s) instead of the calibrated or default one")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder of benchmark records (python -m bench --suite train) to calibrate compute from "
                        "(default: bench/results of this checkout, if any)")
    parser.add_argument("--top", type=int, default=5, help="plans to list: the best and the runners-up (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--save", type=Path, default=None,
                        help="write the recommended ParallelPlan to this JSON file (also valid YAML), the format of "
                        "`torchrun -m model.train --plan FILE`")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus must be positive, got {args.gpus}")
    node = GPUS[args.gpu].gpus_per_node
    if args.gpus > node and args.gpus % node:
        parser.error(f"--gpus ({args.gpus}) must be a multiple of the node size ({node}) beyond one node")
    for name in ("tokens_per_pack", "micro_batches", "sample_length", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.tiles_per_pack < 0:
        parser.error(f"--tiles-per-pack must be >= 0, got {args.tiles_per_pack}")
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        parser.error(f"--efficiency must be in (0, 1], got {args.efficiency}")
    return args


def cost_dict(cost: PlanCost) -> dict:
    return {
        "plan": cost.plan.to_dict(),
        "components": {name: {**dataclasses.asdict(part), "memory_bytes": part.memory_bytes}
                       for name, part in cost.components.items()},
        "micro_batches": cost.micro_batches,
        "memory_bytes": cost.memory_bytes, "memory_budget_bytes": cost.memory_budget_bytes,
        "compute_s": cost.compute_s, "exposed_communication_s": cost.exposed_communication_s,
        "tensor_parallel_s": cost.tensor_parallel_s, "context_parallel_s": cost.context_parallel_s,
        "optimizer_s": cost.optimizer_s, "reference_bytes": cost.reference_bytes, "reference_s": cost.reference_s,
        "step_s": cost.step_s,
        "tokens_per_s_per_gpu": cost.tokens_per_s_per_gpu, "mfu": cost.mfu, "model_flops_per_gpu": cost.model_flops_per_gpu,
    }


def result_dict(shape: ModelShape, gpus: int, gpu: GPU, workload: Workload, assumptions: Assumptions,
                recommendation: Recommendation) -> dict:
    return {
        "model": dataclasses.asdict(shape),
        "gpus": gpus,
        "gpu": dataclasses.asdict(gpu),
        "workload": dataclasses.asdict(workload),
        "assumptions": dataclasses.asdict(assumptions),
        "considered": recommendation.considered,
        "skipped_tp": {str(tp): why for tp, why in recommendation.skipped_tp.items()},
        "reason": recommendation.reason,
        "warnings": list(recommendation.warnings),
        "best": None if recommendation.best is None else cost_dict(recommendation.best),
        "alternatives": [cost_dict(cost) for cost in recommendation.alternatives],
    }


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _ms(value: float) -> str:
    return f"{value * 1e3:,.0f}"


def _plan_summary(plan: ParallelPlan) -> str:
    parts = [f"{name} {plan.component(name).sharding}{'+ckpt' if plan.component(name).activation_checkpointing else ''}"
             for name in COMPONENTS]
    return ", ".join(parts) + f"; tp {plan.tp}, cp {plan.cp}, dp_replicate {plan.dp_replicate}"


def render(shape: ModelShape, gpus: int, gpu: GPU, workload: Workload, assumptions: Assumptions,
           recommendation: Recommendation) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output would be cut to rich's 80 columns, too narrow for the breakdown.
    console = Console(width=None if sys.stdout.isatty() else 132)
    console.print(f"[bold]{shape.name}[/bold] on {gpus} x {gpu.name}: {recommendation.considered} plans costed")
    for warning in recommendation.warnings:
        console.print(f"[yellow]warning: {warning}[/yellow]", highlight=False)
    best = recommendation.best
    if best is None:
        console.print(f"[red]{recommendation.reason}[/red]")
    else:
        steps = best.micro_batches
        table = Table(title=f"Recommended plan: tp {best.plan.tp}, cp {best.plan.cp}, dp_replicate {best.plan.dp_replicate}, prefetch "
                      f"{best.plan.prefetch}. Per GPU: memory in GiB, times in ms a step ({steps} micro-batch(es))")
        for column in ("part", "plan", "params", "grads", "optim", "activ", "memory", "compute", "comm", "exposed"):
            table.add_column(column, justify="left" if column in ("part", "plan") else "right")
        for name in COMPONENTS:
            part, plan = best.components[name], best.plan.component(name)
            table.add_row(
                name, plan.sharding + ("+ckpt" if plan.activation_checkpointing else ""),
                _gib(part.parameters_bytes), _gib(part.gradients_bytes), _gib(part.optimizer_bytes),
                _gib(part.activations_bytes), _gib(part.memory_bytes),
                _ms(part.compute_s * steps), _ms(part.communication_s * steps), _ms(part.exposed_communication_s * steps),
            )
        if best.plan.tp > 1:
            table.add_row("tp", "all-reduce", "", "", "", "", "", "", _ms(best.tensor_parallel_s), _ms(best.tensor_parallel_s))
        if best.plan.cp > 1:
            table.add_row("cp", "all-to-all", "", "", "", "", "", "", _ms(best.context_parallel_s), _ms(best.context_parallel_s))
        if workload.reference_model:
            table.add_row("reference", "zero3, no grad", _gib(best.reference_bytes), "", "", "", _gib(best.reference_bytes),
                          _ms(best.reference_s), "", "")
        table.add_row("AdamW", "HBM-bound", "", "", "", "", "", _ms(best.optimizer_s), "", "")
        table.add_row("total", f"of {_gib(best.memory_budget_bytes)}", "", "", "", "", _gib(best.memory_bytes),
                      _ms(best.compute_s + best.optimizer_s), "", _ms(best.exposed_communication_s))
        console.print(table)
        console.print(
            f"step {best.step_s:.3f} s = compute {best.compute_s:.3f} s + exposed communication "
            f"{best.exposed_communication_s:.3f} s + optimizer {best.optimizer_s:.3f} s"
            + (f" + reference forwards {best.reference_s:.3f} s" if workload.reference_model else "") + "; "
            f"{best.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {best.mfu:.1%}"
        )
    if recommendation.alternatives:
        table = Table(title=f"Runners-up: within {PREDICTION_MARGIN:.0%} of the fastest first, the leanest first; no variant of a "
                      f"plan above (the same tp, cp and dp_replicate within {PREDICTION_MARGIN:.0%} in step time and memory)")
        for column in ("plan", "memory (GiB)", "step (s)", "tokens/s/GPU", "MFU"):
            table.add_column(column, justify="left" if column == "plan" else "right")
        for cost in recommendation.alternatives:
            table.add_row(_plan_summary(cost.plan), _gib(cost.memory_bytes), f"{cost.step_s:.3f}",
                          f"{cost.tokens_per_s_per_gpu:,.0f}", f"{cost.mfu:.1%}")
        console.print(table)
    console.print("[bold]Assumptions[/bold]")
    lines = [
        f"{gpu.name}: {gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s dense bf16, {_gib(gpu.hbm_bytes)} GiB HBM at "
        f"{gpu.hbm_bandwidth / 1e12:.2f} TB/s, NVLink {gpu.nvlink_bandwidth / 1e9:.0f} GB/s and network "
        f"{gpu.network_bandwidth / 1e9:.0f} GB/s per GPU and direction, {gpu.gpus_per_node} GPUs a node",
        f"compute efficiency {assumptions.compute_efficiency:.1%} of peak ({assumptions.efficiency_source})",
        f"collectives at {assumptions.collective_efficiency:.0%} of link bandwidth (rings) plus "
        f"{assumptions.collective_latency_s * 1e6:.0f} us each within a node, {assumptions.network_latency_s * 1e6:.0f} us "
        "across nodes; explicit prefetch hides "
        f"FSDP traffic behind the same pass's compute ({assumptions.prefetch0_overlap:.0%} without prefetch); "
        "tensor-parallel all-reduces not overlapped",
        f"memory budget {assumptions.memory_fraction:.0%} of HBM; bf16 compute parameters, fp32 master parameters, "
        "gradients and reductions, AdamW fp32 moments; activations bf16 without attention scores (flash attention), "
        "logits never materialised",
        f"workload per data-parallel rank and micro-batch: {workload.tokens_per_pack} tokens, "
        f"{workload.tiles_per_pack} tiles, samples of {workload.sample_length} tokens; {workload.micro_batches} "
        "micro-batch(es) a step",
    ]
    lines += [f"tp {tp} skipped: {why}" for tp, why in recommendation.skipped_tp.items()]
    for line in lines:
        console.print(f"- {line}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command("python -m internvl3_engine.planner", lambda: _plan(args))


def _plan(args: argparse.Namespace) -> int:
    gpu = gpu_kind(args.gpu)
    shape = model_shape(args.config if args.config is not None else args.preset)
    workload = Workload(args.tokens_per_pack, args.tiles_per_pack, args.micro_batches, args.sample_length, args.reference_model)
    if args.efficiency is not None:
        assumptions = Assumptions(compute_efficiency=args.efficiency, efficiency_source="--efficiency")
    else:
        calibration = calibrate(gpu, args.results if args.results is not None else default_results_dir())
        assumptions = Assumptions(compute_efficiency=calibration.efficiency, efficiency_source=calibration.source)
    recommendation = recommend(shape, args.gpus, gpu, workload, assumptions, top=args.top)
    if args.json:
        print(json.dumps(result_dict(shape, args.gpus, gpu, workload, assumptions, recommendation)))
    else:
        render(shape, args.gpus, gpu, workload, assumptions, recommendation)
    if recommendation.best is None:
        return 1
    if args.save is not None:
        args.save.write_text(json.dumps(recommendation.best.plan.to_dict(), indent=2) + "\n")
        if not args.json:
            print(f"plan written to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
