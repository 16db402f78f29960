"""parallelize(): apply a ParallelPlan to a model with FSDP2, component by component.

The policy, in order:
1. Find the components: ``components`` given explicitly, else ``model.engine_components()`` (the
   reference model), else transformers' InternVL names (vision_tower, multi_modal_projector,
   language_model).
2. For each component, in forward execution order (vision, projector, language): with tp > 1, split the
   LLM's blocks over the mesh's tp dim (tensor_parallel.py); wrap each transformer block (the children of
   the component's largest nn.ModuleList) with activation checkpointing and torch.compile if asked, shard
   it with ``fully_shard`` over the data-parallel dims, then shard the component itself (its remaining
   parameters: embeddings, norms, the LM head). Where modules outside the components hold parameters
   (transformers' lm_head, whose LLM embeddings are also called outside the LLM's forward), the LLM's
   remaining parameters are left to the root instead.
3. Shard the root (parameters outside every component, if any) with the language plan.
4. Prefetch: in forward each FSDP module all-gathers the next ``prefetch`` modules, so the LLM's first
   blocks are gathered while the ViT and projector compute; in backward the same in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .activation_checkpoint import checkpoint_blocks
from .context import check_context_parallel_blocks
from .plan import COMPONENTS, ComponentPlan, ParallelPlan
from .tensor_parallel import apply_tensor_parallel

TRANSFORMERS_NAMES = {"vision": "vision_tower", "projector": "multi_modal_projector", "language": "language_model"}


@dataclass(frozen=True)
class Meshes:
    """The device meshes over the world laid out (dp_replicate, dp_shard, cp, tp), tp innermost.

    ``shard``: zero2 / zero3 components, FSDP over its (dp_replicate, dp_shard) dims (HSDP when
    dp_replicate > 1), where its "dp_shard" dim spans the data-parallel and context-parallel ranks together
    (dp_shard x cp: cp ranks hold different shards, and FSDP's gradient reduction sums their partial
    gradients). ``replicate``: replicated components, the same ranks as (all of them but tp, 1), so FSDP2
    keeps whole copies and all-reduces gradients. Both have the same tp dim. ``layout``: the 4-D mesh whose
    "cp" dim is the context-parallel group (None when cp is 1).
    """

    shard: DeviceMesh
    replicate: DeviceMesh
    layout: DeviceMesh | None = None

    def root(self, sharding: str) -> DeviceMesh:
        return self.replicate if sharding == "replicate" else self.shard

    def data_parallel(self, sharding: str) -> DeviceMesh:
        return self.root(sharding)["dp_replicate", "dp_shard"]

    def tensor_parallel(self, sharding: str) -> DeviceMesh:
        return self.root(sharding)["tp"]


@dataclass
class ParallelState:
    """What parallelize() built: the meshes, and the FSDP modules in forward execution order."""

    meshes: Meshes
    modules: list[nn.Module]
    plan: ParallelPlan

    @property
    def dp_world_size(self) -> int:
        """Data-parallel ranks: the number of different micro-batches a step trains on."""
        return self.meshes.shard.size() // (self.plan.tp * self.plan.cp)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index (tensor- and context-parallel peers share it, and their micro-batches)."""
        replicate, shard, _ = self.meshes.shard.get_coordinate()
        return (replicate * self.meshes.shard.size(1) + shard) // self.plan.cp

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The ranks this rank splits its packs' tokens with (None without context parallelism)."""
        return self.meshes.layout["cp"].get_group() if self.meshes.layout is not None else None


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


def root_holds_parameters(model: nn.Module, found: dict[str, nn.Module]) -> bool:
    """Whether a module outside every component holds parameters (transformers' lm_head, tied or not)."""
    inside = {id(sub) for module in found.values() for sub in module.modules()}
    return any(next(m.parameters(recurse=False), None) is not None for m in model.modules() if id(m) not in inside)


def build_meshes(plan: ParallelPlan, device_type: str) -> Meshes:
    world = dist.get_world_size()
    plan.check_world_size(world)
    dp_shard = world // (plan.dp_replicate * plan.cp * plan.tp)
    names = ("dp_replicate", "dp_shard", "tp")
    layout = None
    if plan.cp > 1:  # the same row-major rank order: the 3-D meshes' dp_shard index is dp_shard_index * cp + cp_index
        layout = init_device_mesh(device_type, (plan.dp_replicate, dp_shard, plan.cp, plan.tp),
                                  mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
    return Meshes(
        shard=init_device_mesh(device_type, (plan.dp_replicate, dp_shard * plan.cp, plan.tp), mesh_dim_names=names),
        replicate=init_device_mesh(device_type, (plan.dp_replicate * dp_shard * plan.cp, 1, plan.tp), mesh_dim_names=names),
        layout=layout,
    )


def _shard(module: nn.Module, component: ComponentPlan, meshes: Meshes, cast_inputs: bool) -> None:
    """fully_shard ``module``; ``cast_inputs``: its floating inputs are cast to param_dtype (the vision tower's
    pixels). The LLM's units and the root keep theirs: V2PE positions, loss weights and normalisers must stay
    float32 (in bfloat16 a visual step of 1/256 vanishes past position 2 and 1/sqrt(x) keeps 3 digits), and
    the hidden states reach the blocks in param_dtype from the embeddings anyway."""
    fully_shard(
        module,
        mesh=meshes.data_parallel(component.sharding),
        reshard_after_forward=component.sharding == "zero3",
        mp_policy=MixedPrecisionPolicy(param_dtype=component.param_dtype, reduce_dtype=component.reduce_dtype,
                                       cast_forward_inputs=cast_inputs),
    )


def _prepare_blocks(blocks: nn.ModuleList, component: ComponentPlan) -> None:
    if component.activation_checkpointing:
        checkpoint_blocks(blocks)
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
    mesh: Meshes | None = None,
) -> ParallelState:
    """Shard ``model`` in place by ``plan`` (default ParallelPlan()); returns the ParallelState.

    Needs an initialised default process group. ``mesh``: the Meshes to use instead of ones built from
    the plan (see build_meshes).
    """
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (torchrun, or init_process_group)")
    plan = ParallelPlan() if plan is None else plan
    if not isinstance(plan, ParallelPlan):
        raise TypeError(f"plan must be a ParallelPlan, got {type(plan).__name__}")
    found = find_components(model, components)
    if plan.cp > 1:
        check_context_parallel_blocks(find_blocks(found["language"]), plan.cp, plan.tp)
    device = next(model.parameters()).device
    meshes = mesh if mesh is not None else build_meshes(plan, "cuda" if device.type == "cuda" else "cpu")
    if meshes.shard.size(2) != plan.tp:
        raise ValueError(f"mesh has a tp dim of {meshes.shard.size(2)} but plan.tp = {plan.tp}")
    # transformers' layout: the output head outside the LLM, and the token embeddings called outside the LLM's
    # forward (to merge the image rows). FSDP2 gathers a module's parameters only around its own forward, so
    # the LLM's embeddings, final norm and head join the root, gathered for the whole forward.
    language_with_root = root_holds_parameters(model, found)
    order: list[nn.Module] = []
    for name in COMPONENTS:
        module, component = found[name], plan.component(name)
        blocks = find_blocks(module)
        if name == "language" and plan.tp > 1:
            if blocks is None:
                raise ValueError("tp > 1 needs the language component to hold its decoder blocks in an nn.ModuleList")
            apply_tensor_parallel(blocks, meshes.tensor_parallel(component.sharding))
        if blocks is not None:
            _prepare_blocks(blocks, component)
            for block in blocks:
                _shard(block, component, meshes, cast_inputs=name != "language")
        if not (name == "language" and language_with_root):
            _shard(module, component, meshes, cast_inputs=name != "language")
            # The component's own parameters (embeddings, first norms) are gathered when it starts, before its blocks.
            order.append(module)
        order.extend(blocks or [])
    if model not in found.values():
        _shard(model, plan.language, meshes, cast_inputs=False)
    if plan.prefetch:
        set_prefetch(order, plan.prefetch)
    return ParallelState(meshes=meshes, modules=order, plan=plan)
