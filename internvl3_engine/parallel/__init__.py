"""Parallelism for InternVL3 training on torch.distributed: per-component FSDP2 sharding with
cross-component prefetch, tensor parallelism of the LLM, context parallelism of a pack's tokens (Ulysses
attention), the square-averaged loss across ranks, gradient clipping across meshes, sharded checkpoints,
and vision-aware load balancing."""

from .activation_checkpoint import checkpoint_blocks
from .balance import Assignment, CostModel, balance, naive_split
from .checkpoint import PendingSave, async_save_sharded, load_sharded, save_sharded
from .context import ContextParallel, ContextShard, check_context_parallel_heads, gather_chunks, ulysses_attention
from .gradients import clip_grad_norm_
from .loss import data_parallel_loss, global_weight_sum
from .parallelize import Meshes, ParallelState, build_meshes, parallelize
from .plan import ComponentPlan, ParallelPlan

__all__ = [
    "Assignment",
    "ComponentPlan",
    "ContextParallel",
    "ContextShard",
    "CostModel",
    "Meshes",
    "ParallelPlan",
    "ParallelState",
    "PendingSave",
    "async_save_sharded",
    "balance",
    "build_meshes",
    "check_context_parallel_heads",
    "checkpoint_blocks",
    "clip_grad_norm_",
    "data_parallel_loss",
    "gather_chunks",
    "global_weight_sum",
    "load_sharded",
    "naive_split",
    "parallelize",
    "save_sharded",
    "ulysses_attention",
]
