"""Activation checkpointing of transformer blocks, the one implementation that parallelize and single-process
training share."""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of keeping them: the block's forward runs
    under torch.utils.checkpoint (non-reentrant). The forward is replaced on the block itself, so the
    blocks stay the same modules: parameter and state_dict names, FSDP2 and tensor-parallel wrapping and
    torch.compile see no wrapper. Applying it twice is harmless."""
    for block in blocks:
        if getattr(block, "activation_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block.activation_checkpointed = True
