"""The square-averaged loss across data-parallel ranks.

Each rank holds sum(w*CE) and sum(w) of its own micro-batches. The global loss is
sum_ranks sum(w*CE) / sum_ranks sum(w): one all-reduce of sum(w) per step makes every rank's local term
exact. FSDP2 and replicate average gradients over the data-parallel ranks (divide by their number), so
the local loss is scaled by that number for the averaged gradients to be the global loss's gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_weight_sum(weight_sum: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """sum(w) over all data-parallel ranks (one all-reduce); the input is left untouched."""
    total = weight_sum.detach().clone().to(torch.float32)
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def data_parallel_loss(
    weighted_loss_sum: torch.Tensor, weight_sum: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """This rank's loss term, weighted_loss_sum * world / (global sum(w)); 0 where the global sum is 0.

    Its gradients, averaged over the ranks by FSDP2 or replicate, are the gradients of the global loss
    sum(w*CE) / sum(w); the global loss itself is the mean of these terms over the ranks."""
    total = global_weight_sum(weight_sum, group)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    return weighted_loss_sum * world / total.clamp_min(torch.finfo(torch.float32).tiny)
