"""The planner's search: every plan the engine can run on the GPUs, costed; the best that fits memory.

Enumerated: each component's sharding (replicate, zero2, zero3), activation checkpointing of the ViT and
the LLM (the projector has no blocks to checkpoint), the LLM's tensor-parallel degree (1, 2, 4, 8: within
a node, dividing its query and key-value heads and FFN width), the context-parallel degree (1, 2, 4, 8:
with tp within a node, as Ulysses attention's head counts allow), and HSDP (dp_replicate = 1, or one
replica group a node when there are several nodes). Mixed precision is fixed (bf16 parameters for compute,
fp32 reductions) and so is prefetch (PREFETCH: the cost model never finds less prefetch faster). "Fastest"
is the most tokens per second per GPU: tensor- and context-parallel peers share a pack, so step times of
different tp and cp differ in tokens. "Best" (rank): among the plans within PREDICTION_MARGIN of the fastest,
the one with the most memory headroom; the runners-up leave out variants of a plan listed before them
(alike).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..parallel.context import check_context_parallel_heads
from ..parallel.plan import SHARDINGS, ComponentPlan, ParallelPlan
from .cost import Assumptions, PlanCost, Workload, estimate
from .hardware import GIB, GPU
from .shape import ModelShape

PREFETCH = 1
TENSOR_PARALLEL_DEGREES = (1, 2, 4, 8)
CONTEXT_PARALLEL_DEGREES = (1, 2, 4, 8)

PREDICTION_MARGIN = 0.03
"""The differences the cost model cannot resolve, as a fraction of a step time and of the memory budget.
Plans predicted within it of the fastest are ranked by memory (the leanest first: headroom is what a
prediction's error, fragmentation or a longer pack than planned eats), runners-up within it of a listed
plan in both step time and memory are left out as its variants, and a recommended plan within it of the
budget is warned about. 3% is under the model's known error: its step times have not been checked against
measured multi-GPU steps (bench/results/README.md, "Planner predictions"), the one compute efficiency it
applies to every plan is the measured MFU of one preset, 9% off the next one's (H100: InternVL3-2B 28.1%,
1B 25.7%), and plans this close differ in terms (exposed communication, recompute, all-to-alls) costed
from assumed overlap and link efficiency."""


def context_parallel_degrees(shape: ModelShape, tp: int, gpus: int, gpu: GPU) -> list[int]:
    """The cp degrees to try beside tensor-parallel degree ``tp``: their all-to-alls within a node, the
    heads per tensor-parallel rank split as Ulysses attention needs."""
    usable = []
    for cp in CONTEXT_PARALLEL_DEGREES:
        if cp * tp > min(gpus, gpu.gpus_per_node) or gpus % (cp * tp):
            continue
        try:
            check_context_parallel_heads(cp, shape.heads // tp, shape.kv_heads // tp)
        except ValueError:
            continue
        usable.append(cp)
    return usable


@dataclass(frozen=True)
class Recommendation:
    """The best plan that fits (None if none does, with ``reason``) and the runners-up in rank order (see
    rank and alike), with what the user should know of the workload or the plan (``warnings``)."""

    best: PlanCost | None
    alternatives: list[PlanCost]
    considered: int
    reason: str | None
    skipped_tp: dict[int, str]  # degrees the engine or the model rule out, and why
    warnings: list[str]


def check_gpus(gpus: int, gpu: GPU) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive int, got {gpus!r}")
    if gpus > gpu.gpus_per_node and gpus % gpu.gpus_per_node:
        raise ValueError(f"gpus ({gpus}) must be a multiple of the node size ({gpu.gpus_per_node}) beyond one node")


def tensor_parallel_degrees(shape: ModelShape, gpus: int, gpu: GPU) -> tuple[list[int], dict[int, str]]:
    """The tp degrees to try, and those skipped with the reason."""
    usable, skipped = [], {}
    for tp in TENSOR_PARALLEL_DEGREES:
        if tp > min(gpus, gpu.gpus_per_node) or gpus % tp:
            continue  # not a degree of this machine
        uneven = [f"{name} {value}" for name, value in
                  (("heads", shape.heads), ("kv heads", shape.kv_heads), ("FFN width", shape.intermediate)) if value % tp]
        if uneven:
            skipped[tp] = f"does not divide the LLM's {', '.join(uneven)}"
            continue
        try:
            ParallelPlan(tp=tp)
        except ValueError as error:  # the engine cannot run it (yet)
            skipped[tp] = str(error)
            continue
        usable.append(tp)
    return usable, skipped


def candidate_plans(shape: ModelShape, gpus: int, gpu: GPU) -> tuple[list[ParallelPlan], dict[int, str]]:
    check_gpus(gpus, gpu)
    degrees, skipped = tensor_parallel_degrees(shape, gpus, gpu)
    nodes = gpus // gpu.gpus_per_node
    replica_counts = (1, nodes) if nodes > 1 else (1,)

    def component(sharding: str, checkpointing: bool) -> ComponentPlan:
        return ComponentPlan(sharding=sharding, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                             activation_checkpointing=checkpointing)

    plans = []
    parallel = [(tp, cp) for tp in degrees for cp in context_parallel_degrees(shape, tp, gpus, gpu)]
    for vision, vision_ckpt, projector, language, language_ckpt, (tp, cp), replicas in itertools.product(
        SHARDINGS, (False, True), SHARDINGS, SHARDINGS, (False, True), parallel, replica_counts
    ):
        if (gpus // (tp * cp)) % replicas:
            continue
        plans.append(ParallelPlan(
            vision=component(vision, vision_ckpt), projector=component(projector, False),
            language=component(language, language_ckpt), dp_replicate=replicas, tp=tp, cp=cp, prefetch=PREFETCH,
        ))
    return plans, skipped


def rank(costs: list[PlanCost]) -> list[PlanCost]:
    """The fitting plans best first: those predicted within PREDICTION_MARGIN of the fastest by memory, the
    leanest first, then the others by speed."""
    fitting = sorted((cost for cost in costs if cost.fits), key=lambda cost: (-cost.tokens_per_s_per_gpu, cost.memory_bytes))
    if not fitting:
        return []
    floor = fitting[0].tokens_per_s_per_gpu * (1 - PREDICTION_MARGIN)
    close = [cost for cost in fitting if cost.tokens_per_s_per_gpu >= floor]
    return sorted(close, key=lambda cost: (cost.memory_bytes, -cost.tokens_per_s_per_gpu)) + fitting[len(close):]


def alike(cost: PlanCost, other: PlanCost) -> bool:
    """Whether two plans are variants the cost model cannot tell apart: the same tp, cp and dp_replicate, and
    step times and memory within PREDICTION_MARGIN (of the shorter step, of the memory budget)."""
    plan, other_plan = cost.plan, other.plan
    return ((plan.tp, plan.cp, plan.dp_replicate) == (other_plan.tp, other_plan.cp, other_plan.dp_replicate)
            and abs(cost.step_s - other.step_s) <= PREDICTION_MARGIN * min(cost.step_s, other.step_s)
            and abs(cost.memory_bytes - other.memory_bytes) <= PREDICTION_MARGIN * cost.memory_budget_bytes)


def recommend(
    shape: ModelShape, gpus: int, gpu: GPU, workload: Workload | None = None, assumptions: Assumptions | None = None,
    top: int = 5,
) -> Recommendation:
    """Cost every candidate plan; the best (rank) that fits ``assumptions.memory_fraction`` of HBM, and the
    next ``top - 1`` fitting ones that are no variant of a plan before them (alike). ValueError for a
    workload the model cannot hold (Workload.check)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    workload = workload or Workload()
    assumptions = assumptions or Assumptions()
    plans, skipped = candidate_plans(shape, gpus, gpu)
    costs = [estimate(shape, plan, gpus, gpu, workload, assumptions) for plan in plans]
    listed: list[PlanCost] = []
    for cost in rank(costs):
        if len(listed) == top:
            break
        if not any(alike(cost, other) for other in listed):
            listed.append(cost)
    warnings = workload.warnings(shape)
    if listed and listed[0].memory_bytes > (1 - PREDICTION_MARGIN) * listed[0].memory_budget_bytes:
        warnings.append(f"the recommended plan needs {listed[0].memory_bytes / GIB:.1f} of {listed[0].memory_budget_bytes / GIB:.1f} "
                        f"GiB, within the cost model's {PREDICTION_MARGIN:.0%} margin of the budget: it may run out of memory "
                        "(more GPUs, or fewer tokens or tiles per pack, leave room)")
    reason = None
    if not listed:
        leanest = min(costs, key=lambda cost: cost.memory_bytes)
        reason = (
            f"no plan fits: the leanest needs {leanest.memory_bytes / GIB:.1f} GiB per GPU, over the budget of "
            f"{leanest.memory_budget_bytes / GIB:.1f} GiB ({assumptions.memory_fraction:.0%} of {gpu.name}'s HBM); "
            "use more GPUs, fewer tokens or tiles per pack, or a GPU with more memory"
        )
    return Recommendation(
        best=listed[0] if listed else None, alternatives=listed[1:], considered=len(costs), reason=reason,
        skipped_tp=skipped, warnings=warnings,
    )
