"""parallelize(): apply a ParallelPlan to a model with FSDP2, component by component.

The policy, in order:
1. Find the components: ``components`` given explicitly, else ``model.engine_components()`` (the
   reference model), else transformers' InternVL names (vision_tower, multi_modal_projector,
   language_model).
2. For each component, in forward execution order (vision, projector, language): wrap each transformer
   block (the children of the component's largest nn.ModuleList) with activation checkpointing and
   torch.compile if asked, shard it with ``fully_shard``, then shard the component itself (its remaining
   parameters: embeddings, norms, the LM head).
3. Shard the root (parameters outside every component, if any) with the language plan.
4. Prefetch (CUDA only: FSDP2's explicit prefetch runs on CUDA streams): in forward each FSDP module
   all-gathers the next ``prefetch`` modules, so the LLM's first blocks are gathered while the ViT and
   projector compute; in backward the same in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .plan import COMPONENTS, ComponentPlan, ParallelPlan

TRANSFORMERS_NAMES = {"vision": "vision_tower", "projector": "multi_modal_projector", "language": "language_model"}


@dataclass
class ParallelState:
    """What parallelize() built: the meshes, and the FSDP modules in forward execution order."""

    mesh: DeviceMesh  # (dp_replicate, dp_shard): zero2 / zero3 components
    replicate_mesh: DeviceMesh  # (world, 1): replicated components
    modules: list[nn.Module]
    plan: ParallelPlan

    @property
    def dp_world_size(self) -> int:
        return self.mesh.size()


def find_components(model: nn.Module, components: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """name -> module for vision, projector and language."""
    if components is None:
        if hasattr(model, "engine_components"):
            components = model.engine_components()
        else:
            inner = getattr(model, "model", model)  # InternVLForConditionalGeneration keeps them in .model
            components = {name: getattr(inner, attr, None) for name, attr in TRANSFORMERS_NAMES.items()}
    if not isinstance(components, dict):
        raise TypeError(f"components must be a dict name -> nn.Module, got {type(components).__name__}")
    missing = [name for name in COMPONENTS if not isinstance(components.get(name), nn.Module)]
    if missing:
        raise ValueError(
            f"components must name an nn.Module for each of {COMPONENTS}; missing {missing} (give them "
            "explicitly, or define model.engine_components())"
        )
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"components has unknown names {unknown}; expected {COMPONENTS}")
    return {name: components[name] for name in COMPONENTS}


def find_blocks(component: nn.Module) -> nn.ModuleList | None:
    """The component's stack of transformer blocks: its nn.ModuleList with the most parameters."""
    best, best_size = None, 0
    for module in component.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return best


def build_meshes(plan: ParallelPlan, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    world = dist.get_world_size()
    if world % plan.dp_replicate:
        raise ValueError(f"dp_replicate = {plan.dp_replicate} must divide the world size {world}")
    mesh = init_device_mesh(device_type, (plan.dp_replicate, world // plan.dp_replicate), mesh_dim_names=("dp_replicate", "dp_shard"))
    replicate_mesh = init_device_mesh(device_type, (world, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
    return mesh, replicate_mesh


def _shard(module: nn.Module, component: ComponentPlan, state_meshes: tuple[DeviceMesh, DeviceMesh]) -> None:
    mesh, replicate_mesh = state_meshes
    fully_shard(
        module,
        mesh=replicate_mesh if component.sharding == "replicate" else mesh,
        reshard_after_forward=component.sharding == "zero3",
        mp_policy=MixedPrecisionPolicy(param_dtype=component.param_dtype, reduce_dtype=component.reduce_dtype),
    )


def _prepare_blocks(blocks: nn.ModuleList, component: ComponentPlan) -> None:
    if component.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for index, block in enumerate(blocks):
            blocks[index] = checkpoint_wrapper(block)
    if component.compile:
        for block in blocks:
            block.compile()


def set_prefetch(modules: list[nn.Module], depth: int) -> None:
    """Explicit all-gather prefetch ``depth`` modules ahead in forward and behind in backward."""
    for index, module in enumerate(modules):
        ahead = modules[index + 1 : index + 1 + depth]
        behind = modules[max(0, index - depth) : index][::-1]
        if ahead:
            module.set_modules_to_forward_prefetch(ahead)
        if behind:
            module.set_modules_to_backward_prefetch(behind)


def parallelize(
    model: nn.Module,
    plan: ParallelPlan | None = None,
    components: dict[str, nn.Module] | None = None,
    mesh: tuple[DeviceMesh, DeviceMesh] | None = None,
) -> ParallelState:
    """Shard ``model`` in place by ``plan`` (default ParallelPlan()); returns the ParallelState.

    Needs an initialised default process group. ``mesh``: the (sharding, replicate) meshes to use instead
    of ones built from the plan (see build_meshes).
    """
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (torchrun, or init_process_group)")
    plan = ParallelPlan() if plan is None else plan
    if not isinstance(plan, ParallelPlan):
        raise TypeError(f"plan must be a ParallelPlan, got {type(plan).__name__}")
    found = find_components(model, components)
    device = next(model.parameters()).device
    meshes = mesh if mesh is not None else build_meshes(plan, "cuda" if device.type == "cuda" else "cpu")
    order: list[nn.Module] = []
    for name in COMPONENTS:
        module, component = found[name], plan.component(name)
        blocks = find_blocks(module)
        if blocks is not None:
            _prepare_blocks(blocks, component)
            for block in blocks:
                _shard(block, component, meshes)
        _shard(module, component, meshes)
        # The component's own parameters (embeddings, first norms) are gathered when it starts, before its blocks.
        order.append(module)
        order.extend(blocks or [])
    if model not in found.values():
        _shard(model, plan.language, meshes)
    if plan.prefetch and device.type == "cuda":
        set_prefetch(order, plan.prefetch)
    return ParallelState(mesh=meshes[0], replicate_mesh=meshes[1], modules=order, plan=plan)
