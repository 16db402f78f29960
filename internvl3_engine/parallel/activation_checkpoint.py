"""Activation checkpointing of transformer blocks, the one implementation that parallelize and single-process
training share."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _without_kv_cache(block: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` with a KV cache turned off, as transformers' GradientCheckpointingLayer does: a block
    recomputed in backward would write its keys and values into the cache a second time and attend over
    both copies, so the recomputation would not match the forward. The keywords are transformers' decoder
    layers' (``use_cache``; the cache as ``cache`` from 5.24, ``past_key_values`` before)."""
    off = {"use_cache": False} if kwargs.get("use_cache") else {}
    off.update({name: None for name in ("cache", "past_key_values") if kwargs.get(name) is not None})
    if not off:
        return kwargs
    settings = ", ".join(f"{name}={value}" for name, value in off.items())
    warnings.warn(
        f"{type(block).__name__} is activation-checkpointed and runs with gradients, so it runs without a KV "
        f"cache ({settings}): recomputing it in backward would write the cache again. Under torch.no_grad "
        "(generation) the cache is kept."
    )
    return {**kwargs, **off}


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of keeping them: the block's forward runs
    under torch.utils.checkpoint (non-reentrant). The forward is replaced on the block itself, so the
    blocks stay the same modules: parameter and state_dict names, FSDP2 and tensor-parallel wrapping and
    torch.compile see no wrapper. With gradients enabled a block runs without a KV cache (see
    _without_kv_cache); under torch.no_grad nothing is recomputed and a cache is kept. Applying it twice is
    harmless."""
    for block in blocks:
        if getattr(block, "activation_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args, _forward=forward, _block=block, **kwargs):
            if torch.is_grad_enabled():
                kwargs = _without_kv_cache(_block, kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block.activation_checkpointed = True
