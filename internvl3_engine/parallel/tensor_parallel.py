"""Tensor parallelism of the LLM's decoder blocks with torch.distributed.tensor.parallel.

Megatron's layout for a Qwen2 block, by module name (the names of transformers' Qwen2DecoderLayer, which the
reference model shares):
- ``self_attn.q_proj``, ``k_proj``, ``v_proj`` and ``mlp.gate_proj``, ``up_proj``: column-parallel (each rank
  keeps a slice of the output features: whole heads of q, k and v, a slice of the MLP's width), so
  attention and the SwiGLU run on local heads and columns without communication;
- ``self_attn.o_proj`` and ``mlp.down_proj``: row-parallel (each rank multiplies its slice of the input
  features; one all-reduce of the block's output in forward, one of the input gradient in backward).
Everything else (norms, embeddings, the output head) stays whole on every tensor-parallel rank; its
gradients are equal across the tensor-parallel peers, which see the same micro-batches.

The attention code must split heads with ``view(tokens, -1, head_dim)`` (local head counts), as transformers'
Qwen2 attention and the reference model do.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def _linear(block: nn.Module, name: str, index: int) -> nn.Linear:
    try:
        module = block.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"tp > 1 needs Qwen2-style LLM blocks with an nn.Linear {name!r}; block {index} "
            f"({type(block).__name__}) has {type(module).__name__ if module is not None else 'none'}"
        )
    return module


def check_tensor_parallel(blocks: nn.ModuleList, tp: int) -> None:
    """ValueError naming ``tp`` unless every block has the Qwen2 linears and whole heads split ``tp`` ways."""
    for index, block in enumerate(blocks):
        for name in COLUMN_PARALLEL:
            features = _linear(block, name, index).out_features
            if features % tp:
                raise ValueError(f"tp = {tp} must divide the output features of {name} ({features})")
        for name in ROW_PARALLEL:
            features = _linear(block, name, index).in_features
            if features % tp:
                raise ValueError(f"tp = {tp} must divide the input features of {name} ({features})")
        head_dim = getattr(block.get_submodule("self_attn"), "head_dim", None)
        if isinstance(head_dim, int):
            for name in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = _linear(block, name, index).out_features // head_dim
                if heads % tp:
                    raise ValueError(f"tp = {tp} must divide the head count of {name} ({heads} heads of {head_dim})")


def apply_tensor_parallel(blocks: nn.ModuleList, tp_mesh: DeviceMesh) -> None:
    """Split each block's linears over ``tp_mesh`` in place (their parameters become DTensors on it)."""
    check_tensor_parallel(blocks, tp_mesh.size())
    styles = {name: ColwiseParallel() for name in COLUMN_PARALLEL} | {name: RowwiseParallel() for name in ROW_PARALLEL}
    for block in blocks:
        parallelize_module(block, tp_mesh, styles)
