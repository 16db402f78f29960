"""Gradient clipping over parameters sharded on several meshes.

Under a ParallelPlan the parameters are DTensors on different meshes: the data-parallel mesh of each
component's sharding, and (tp > 1) the 2-D data x tensor-parallel mesh of the LLM's split linears.
torch.nn.utils.clip_grad_norm_ cannot combine DTensors of different meshes in one norm, so the norm is taken
per mesh (each a full reduction over its mesh), then combined; every rank gets the same total.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global 2-norm is at most ``max_norm``; returns the norm
    before clipping (a float32 scalar tensor). Works on plain tensors, FSDP2 and tensor-parallel DTensors."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    # Keyed by the mesh's value (DeviceMesh hashes by its ranks and names): slices of one mesh taken
    # separately are equal, so each mesh costs one reduction whatever the number of FSDP units on it.
    grads_by_mesh: dict = {}
    for parameter in parameters:
        if parameter.grad is not None:
            grads_by_mesh.setdefault(getattr(parameter.grad, "device_mesh", None), []).append(parameter.grad)
    norms = []
    for grads in grads_by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float())
    if not norms:
        return torch.zeros(())
    total = torch.stack([norm.to(norms[0].device) for norm in norms]).square().sum().sqrt()
    # A tensor coefficient, applied even when it is 1 (as torch's clip_grad_norm_ does): deciding on the host
    # would synchronise with the GPU before the optimizer step could be launched.
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grads in grads_by_mesh.values():
        # In place on the local shards (a DTensor's to_local shares its storage): no DTensor dispatch.
        local = [grad.to_local() if hasattr(grad, "to_local") else grad for grad in grads]
        torch._foreach_mul_(local, coefficient.to(local[0].device))
    return total
