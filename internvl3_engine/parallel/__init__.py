"""Parallelism for InternVL3 training on torch.distributed: per-component FSDP2 sharding with
cross-component prefetch, the square-averaged loss across ranks, sharded checkpoints, and vision-aware
load balancing."""

from .balance import Assignment, CostModel, balance, naive_split
from .checkpoint import load_sharded, save_sharded
from .loss import data_parallel_loss, global_weight_sum
from .parallelize import ParallelState, parallelize
from .plan import ComponentPlan, ParallelPlan

__all__ = [
    "Assignment",
    "ComponentPlan",
    "CostModel",
    "ParallelPlan",
    "ParallelState",
    "balance",
    "data_parallel_loss",
    "global_weight_sum",
    "load_sharded",
    "naive_split",
    "parallelize",
    "save_sharded",
]
