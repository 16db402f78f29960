"""Parallelism for InternVL3 training on torch.distributed: vision-aware load balancing (more to come:
per-component sharding with FSDP2, prefetch across component boundaries, a planner)."""

from .balance import Assignment, CostModel, balance, naive_split

__all__ = ["Assignment", "CostModel", "balance", "naive_split"]
