"""The optimizer side of training: per-component freezing and learning rates, AdamW, warmup + cosine.

Parameter groups: one per (component, decay) pair, component in vision / projector / language. Matrices
and convolution kernels decay; vectors (biases, norm weights, layer scales) and the ViT's CLS token and
position embedding do not. A frozen component has requires_grad False and no group.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

COMPONENTS = ("vision", "projector", "language")
NO_DECAY_NAMES = ("cls_token", "position_embedding")


def apply_freezing(components: dict[str, nn.Module], frozen: dict[str, bool]) -> None:
    """requires_grad False on every parameter of the frozen components (True on the others)."""
    for name, module in components.items():
        module.requires_grad_(not frozen.get(name, False))
    if all(frozen.get(name, False) for name in components):
        raise ValueError("every component is frozen: nothing to train")


def parameter_groups(
    components: dict[str, nn.Module], lr: float, weight_decay: float, component_lr: Optional[dict[str, Optional[float]]] = None
) -> list[dict]:
    """AdamW groups of the trainable parameters; ``component_lr[name]`` (when not None) overrides ``lr``.
    Each group carries ``component`` and its peak ``lr`` (the schedule scales it)."""
    component_lr = component_lr or {}
    groups = []
    seen: set[int] = set()
    for name, module in components.items():
        decay, no_decay = [], []
        for parameter_name, parameter in module.named_parameters():
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))  # a tied head and embedding share one tensor: one group only
            if parameter.ndim < 2 or parameter_name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        peak = component_lr.get(name)
        peak = lr if peak is None else peak
        for params, decay_value in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": peak, "weight_decay": decay_value, "component": name})
    return groups


def build_optimizer(groups: list[dict], betas=(0.9, 0.95), eps: float = 1e-8, device: Optional[torch.device] = None) -> torch.optim.AdamW:
    """AdamW; the fused implementation on CUDA (one kernel for all parameters), the default elsewhere."""
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, betas=tuple(betas), eps=eps, fused=fused)


class WarmupCosine:
    """The learning-rate factor at a step: linear warmup from 1/warmup to 1 over ``warmup_steps``, then half a
    cosine from 1 down to ``min_ratio`` at ``total_steps`` (and ``min_ratio`` after). A callable object, so
    LambdaLR's state_dict saves its settings."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
        if warmup_steps < 0 or total_steps < 1 or not 0 <= min_ratio <= 1:
            raise ValueError(f"need warmup_steps >= 0, total_steps >= 1, 0 <= min_ratio <= 1; got {warmup_steps}, {total_steps}, {min_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float, completed_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """WarmupCosine over the groups' peak lr. ``completed_steps`` > 0 (a resumed run) starts the schedule
    after that many steps, under these settings: the learning rates are the ones a run with them has
    there. The groups must then carry their peak as ``initial_lr`` (a scheduler sets it; a restored
    optimizer state keeps it)."""
    if completed_steps < 0:
        raise ValueError(f"completed_steps must be >= 0, got {completed_steps}")
    # LambdaLR takes the index of the last step taken: -1 for none, and it computes the lr of the next.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio), last_epoch=completed_steps - 1)
