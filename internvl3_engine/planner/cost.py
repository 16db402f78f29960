"""The cost model: memory per GPU and step time of a ParallelPlan, per component.

Stated assumptions (each a named constant here or a field of Assumptions / Workload, printed with results):
- Mixed precision as FSDP2 runs it: fp32 master parameters, bf16 parameters gathered for compute, fp32
  gradients and reductions, AdamW's two fp32 moments.
- Layout (dp_replicate, dp_shard, cp, tp), tp innermost: tensor-parallel peers are neighbouring GPUs of a
  node and share one pack; they split the LLM's blocks (not its embeddings, norm or head, nor the ViT and
  the projector, which every peer runs whole on the pack's tiles). Context-parallel peers share one pack
  too and split its tokens (the LLM's activations and compute 1/cp each) and its tiles (the ViT's); their
  Ulysses attention exchanges q, k, v and the output by all-to-all, four a layer and pass, on the critical
  path (not overlapped). zero2 / zero3 shard over dp_shard x cp (HSDP: replicas all-reduce the shards'
  gradients), replicate keeps whole copies and all-reduces over all data-parallel and cp ranks.
- Gathered at once: zero3 the component's own parameters (embeddings, norm, head) plus (prefetch + 1)
  blocks; zero2 and replicate the whole component. Gradients are reduced every micro-batch (FSDP2's
  default), one FSDP unit's unsharded bf16 gradients live at a time.
- Collectives are rings: a GPU sends and receives (n-1)/n of the data per all-gather or reduce-scatter, twice
  that per all-reduce, at COLLECTIVE_EFFICIENCY of NVLink within a node and of its NIC across nodes, plus a
  fixed latency per collective (collective_latency_s within a node, network_latency_s across nodes): the
  term that dominates small models.
- FSDP's gathers and reductions overlap the component's compute in the same pass (all of it with explicit
  prefetch, PREFETCH0_OVERLAP of it without); one unit's transfer per pass stays exposed (the first gather,
  the last reduction). Tensor-parallel all-reduces are on the critical path (not overlapped).
- Activations in bf16, kept per token (no s^2 attention scores: flash attention keeps only its output and
  log-sum-exp); with activation checkpointing only each block's input plus one block being recomputed.
  The LM head's logits are never materialised (the fused linear cross-entropy chunks them).
- The optimizer step is HBM-bound: OPTIMIZER_HBM_BYTES per local parameter.
- MPO's reference model (Workload.reference_model): its float32 shards, zero3 over dp_shard x cp whatever
  the policy's plan (reference_memory_bytes), and one no-grad forward a pack with its gathers; its gathered
  blocks are freed before the policy's forward, so only the shards add to the peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..parallel.plan import COMPONENTS, ComponentPlan, ParallelPlan
from .flops import training_flops
from .hardware import GPU
from .shape import ModelShape

ACTIVATION_BYTES = 2  # bf16
COMPUTE_PARAM_BYTES = 2  # bf16 copies gathered for forward and backward
MASTER_PARAM_BYTES = 4  # fp32 sharded parameters
GRADIENT_BYTES = 4  # fp32 gradients, reduced in fp32
UNSHARDED_GRADIENT_BYTES = 2  # bf16 gradients of the unit being reduced
ADAM_STATE_BYTES = 8  # two fp32 moments
OPTIMIZER_HBM_BYTES = 28  # AdamW reads parameter, gradient, two moments (16 B), writes parameter and moments (12 B)
LSE_BYTES = 4  # flash attention's fp32 log-sum-exp per head and token
CHECKPOINT_RECOMPUTE = 4 / 3  # a forward (1/3 of training FLOPs) runs again


@dataclass(frozen=True)
class Workload:
    """What each data-parallel rank trains on per micro-batch (tensor- and context-parallel peers share one pack)."""

    tokens_per_pack: int = 16384
    tiles_per_pack: int = 48
    micro_batches: int = 1  # gradient accumulation
    sample_length: int = 4096  # mean sample length in a pack, for attention's sum of L^2
    # MPO with a reference model (not precomputed reference log-probabilities): a frozen copy of the model
    # held beside it (reference_memory_bytes) and run forward, without gradients, on every pack.
    reference_model: bool = False

    def __post_init__(self):
        for name in ("tokens_per_pack", "tiles_per_pack", "micro_batches", "sample_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "tiles_per_pack" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.reference_model, bool):
            raise TypeError(f"reference_model must be a bool, got {self.reference_model!r}")

    def sample_lengths(self) -> list[int]:
        whole, rest = divmod(self.tokens_per_pack, self.sample_length)
        return [self.sample_length] * whole + ([rest] if rest else [])

    def check(self, shape: ModelShape) -> None:
        """A ValueError when a pack cannot hold its tiles: their image tokens (``shape``'s tokens a tile) over
        tokens_per_pack."""
        image_tokens = self.tiles_per_pack * shape.tokens_per_tile
        if image_tokens > self.tokens_per_pack:
            raise ValueError(f"tiles_per_pack {self.tiles_per_pack} x {shape.tokens_per_tile} image tokens a tile of {shape.name} = "
                             f"{image_tokens:,} tokens, more than tokens_per_pack {self.tokens_per_pack:,}")

    def warnings(self, shape: ModelShape) -> list[str]:
        """What of this workload the cost model takes otherwise than given, or cannot be as given, for ``shape``."""
        found = []
        if self.sample_length > self.tokens_per_pack:
            found.append(f"sample_length {self.sample_length:,} is longer than tokens_per_pack {self.tokens_per_pack:,}: "
                         "costed as one sample filling the pack")
        if self.tiles_per_pack and min(self.sample_length, self.tokens_per_pack) < shape.tokens_per_tile:
            found.append(f"samples of {min(self.sample_length, self.tokens_per_pack):,} tokens cannot hold a tile's "
                         f"{shape.tokens_per_tile} image tokens (tiles_per_pack {self.tiles_per_pack})")
        return found


@dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.40  # achieved / peak FLOP/s of the model's matmuls and attention
    efficiency_source: str = "default (no measured figure)"
    collective_efficiency: float = 0.80  # achieved / link bandwidth of NCCL's ring collectives
    memory_fraction: float = 0.90  # of HBM a plan may use (the rest: CUDA context, NCCL buffers, fragmentation)
    prefetch0_overlap: float = 0.50  # of a pass's compute that hides FSDP traffic without explicit prefetch
    collective_latency_s: float = 20e-6  # a collective's fixed cost within a node (launch, ring start-up)
    network_latency_s: float = 60e-6  # the same across nodes

    def __post_init__(self):
        for name in ("compute_efficiency", "collective_efficiency", "memory_fraction", "prefetch0_overlap"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        for name in ("collective_latency_s", "network_latency_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ComponentCost:
    """One component's share of a GPU's memory (bytes) and of a micro-batch's time (seconds)."""

    parameters_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    compute_s: float
    communication_s: float
    exposed_communication_s: float

    @property
    def memory_bytes(self) -> float:
        return self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes


@dataclass(frozen=True)
class PlanCost:
    """The predicted cost of a plan: per component, and the step (all micro-batches and the optimizer)."""

    plan: ParallelPlan
    components: dict[str, ComponentCost]  # per micro-batch
    micro_batches: int
    tensor_parallel_s: float  # per step, exposed
    optimizer_s: float
    step_s: float
    memory_bytes: float
    memory_budget_bytes: float
    tokens_per_s_per_gpu: float
    mfu: float
    model_flops_per_gpu: float  # per step
    context_parallel_s: float = 0.0  # per step, exposed (Ulysses all-to-alls and the image rows' gather)
    reference_bytes: float = 0.0  # an MPO reference model's shards (Workload.reference_model)
    reference_s: float = 0.0  # per step: its no-grad forwards, with their exposed parameter gathers

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.memory_budget_bytes

    @property
    def compute_s(self) -> float:
        return sum(cost.compute_s for cost in self.components.values()) * self.micro_batches

    @property
    def exposed_communication_s(self) -> float:
        fsdp = sum(cost.exposed_communication_s for cost in self.components.values()) * self.micro_batches
        return fsdp + self.tensor_parallel_s + self.context_parallel_s


def ring_fraction(ranks: int) -> float:
    """Share of a collective's data each rank moves in a ring all-gather or reduce-scatter."""
    return (ranks - 1) / ranks


def _local_parameters(shape: ModelShape, name: str, tp: int) -> tuple[float, float, float]:
    """(all, per block, outside the blocks) parameters one GPU holds of component ``name`` before sharding."""
    component = shape.component(name)
    block = component.block_parameters / (tp if name == "language" else 1)
    return component.root_parameters + component.blocks * block, block, component.root_parameters


def language_activation_bytes_per_token(shape: ModelShape, tp: int) -> tuple[float, float]:
    """(a whole decoder layer, a checkpointed layer's input) in bytes per token: the norms' inputs and outputs
    stay whole on tensor-parallel peers, q/k/v, attention output and the SwiGLU's four tensors split."""
    whole = 4 * shape.hidden * ACTIVATION_BYTES
    split = (2 * shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim + 4 * shape.intermediate) * ACTIVATION_BYTES
    split += shape.heads * LSE_BYTES
    return whole + split / tp, shape.hidden * ACTIVATION_BYTES


def vision_activation_bytes_per_token(shape: ModelShape) -> tuple[float, float]:
    """(a whole ViT layer, a checkpointed layer's input) in bytes per token: input, norm, q/k/v, attention
    output, projection (layer scale's input), residual, norm, fc1 and GELU outputs, fc2 output."""
    h, i = shape.vision_hidden, shape.vision_intermediate
    return (10 * h + 2 * i) * ACTIVATION_BYTES + shape.vision_heads * LSE_BYTES, h * ACTIVATION_BYTES


def _activations(shape: ModelShape, name: str, plan: ComponentPlan, tp: int, workload: Workload, cp: int = 1) -> float:
    """Bytes of activations one GPU keeps for backward: its 1/cp of the pack's tokens and tiles."""
    if name == "projector":  # LayerNorm input and output, linear_1 and GELU outputs, per visual token
        per_token = (2 * shape.projector_in_features + 2 * shape.hidden) * ACTIVATION_BYTES
        return per_token * workload.tiles_per_pack * shape.tokens_per_tile / cp
    if name == "language":
        layer, checkpointed = language_activation_bytes_per_token(shape, tp)
        tokens, layers = workload.tokens_per_pack, shape.layers
    else:
        layer, checkpointed = vision_activation_bytes_per_token(shape)
        tokens, layers = workload.tiles_per_pack * shape.vision_tokens_per_tile, shape.vision_layers
    saved = checkpointed if plan.activation_checkpointing else layer
    return tokens / cp * (layers * saved + layer)  # + the block whose activations backward is working through


def context_parallel_bytes(shape: ModelShape, plan: ParallelPlan, workload: Workload) -> float:
    """Bytes one GPU sends (and receives) per micro-batch for context parallelism: per LLM layer and pass
    (forward, backward, and the recomputed forward under activation checkpointing) the all-to-alls of q, k,
    v and the output ((cp - 1)/cp of its tokens' share; key-value heads repeated up to cp when fewer), plus
    the gathered image rows forward and their gradients backward."""
    cp, tp = plan.cp, plan.tp
    if cp == 1:
        return 0.0
    heads, kv_heads = shape.heads / tp, max(shape.kv_heads / tp, cp)
    per_token = (2 * heads + 2 * kv_heads) * shape.head_dim * ACTIVATION_BYTES
    passes = 3 if plan.language.activation_checkpointing else 2
    attention = shape.layers * passes * workload.tokens_per_pack / cp * per_token * ring_fraction(cp)
    rows = workload.tiles_per_pack * shape.tokens_per_tile * shape.hidden * ACTIVATION_BYTES
    return attention + 2 * rows * ring_fraction(cp)


def _bandwidth(gpu: GPU, span: int, assumptions: Assumptions) -> float:
    """A ring over ``span`` consecutive ranks runs on NVLink within a node, else on the GPUs' NICs."""
    link = gpu.nvlink_bandwidth if span <= gpu.gpus_per_node else gpu.network_bandwidth
    return link * assumptions.collective_efficiency


def _latency(gpu: GPU, ranks: int, span: int, assumptions: Assumptions) -> float:
    """The fixed cost of one collective among ``ranks`` ranks spread over ``span`` consecutive ones (none for
    a group of one)."""
    if ranks <= 1:
        return 0.0
    return assumptions.collective_latency_s if span <= gpu.gpus_per_node else assumptions.network_latency_s


def _sharding_ranks(plan: ParallelPlan, gpus: int) -> int:
    """The ranks a zero2 / zero3 component is sharded over: dp_shard x cp."""
    if gpus % (plan.tp * plan.dp_replicate * plan.cp):
        raise ValueError(f"gpus ({gpus}) must be a multiple of tp * dp_replicate * cp ({plan.tp} * {plan.dp_replicate} * {plan.cp})")
    return gpus // plan.tp // plan.dp_replicate


def start_memory_bytes(shape: ModelShape, plan: ParallelPlan, gpus: int) -> float:
    """Bytes of parameters one GPU holds after a sharded start (model.train's --max-steps 0): its float32
    shards of every component, before any gradient, optimizer state or gathered compute copy exists."""
    dp_shard = _sharding_ranks(plan, gpus)
    total = 0.0
    for name in COMPONENTS:
        local, _, _ = _local_parameters(shape, name, plan.tp)
        total += local / (1 if plan.component(name).sharding == "replicate" else dp_shard) * MASTER_PARAM_BYTES
    return total


def reference_memory_bytes(shape: ModelShape, plan: ParallelPlan, gpus: int) -> float:
    """Bytes one GPU holds of an MPO reference model between its forwards: a frozen float32 copy of the model,
    every component zero3 over the dp_shard x cp ranks whatever the policy's plan (a no-grad forward gathers
    a block at a time and frees it; replicated or zero2 it would stay whole on every GPU)."""
    dp_shard = _sharding_ranks(plan, gpus)
    return sum(_local_parameters(shape, name, plan.tp)[0] for name in COMPONENTS) / dp_shard * MASTER_PARAM_BYTES


def estimate(
    shape: ModelShape, plan: ParallelPlan, gpus: int, gpu: GPU, workload: Workload, assumptions: Assumptions
) -> PlanCost:
    """Memory per GPU and step time of ``plan`` training ``shape`` on ``gpus`` GPUs of kind ``gpu``."""
    workload.check(shape)
    tp, replicas, cp = plan.tp, plan.dp_replicate, plan.cp
    dp_shard = _sharding_ranks(plan, gpus)
    data_parallel = gpus // tp
    flops = training_flops(shape, workload.tokens_per_pack, workload.tiles_per_pack, workload.sample_lengths())
    component_flops = {  # one GPU's share: cp peers split the tokens and tiles, tp peers the LLM's blocks
        "vision": (flops["vit_matmuls"] + flops["vit_attention"]) / cp,
        "projector": flops["projector"] / cp,
        "language": (flops["llm_matmuls"] + flops["llm_attention"]) / (tp * cp),
    }
    flop_rate = gpu.peak_bf16_flops * assumptions.compute_efficiency
    overlap = 1.0 if plan.prefetch else assumptions.prefetch0_overlap
    costs, optimizer_parameters, reference_s = {}, 0.0, 0.0
    for name in COMPONENTS:
        component = plan.component(name)
        local, block, root = _local_parameters(shape, name, tp)
        gathered = {
            "zero3": root + min(plan.prefetch + 1, shape.component(name).blocks) * block,
            "zero2": local,
            "replicate": local,
        }[component.sharding]
        shards = 1 if component.sharding == "replicate" else dp_shard
        optimizer_parameters += local / shards

        compute = component_flops[name] / flop_rate
        recompute = CHECKPOINT_RECOMPUTE if component.activation_checkpointing and shape.component(name).blocks else 1.0
        forward_s, backward_s = compute / 3, compute * (2 / 3 + recompute - 1)

        units = shape.component(name).blocks + 1  # FSDP units: one collective of each kind per unit
        shard_latency = units * _latency(gpu, shards, shards * tp, assumptions)
        gather_s = ring_fraction(shards) * local * COMPUTE_PARAM_BYTES / _bandwidth(gpu, shards * tp, assumptions) + shard_latency
        if component.sharding == "replicate":
            forward_comm = 0.0
            reduce_ranks = data_parallel
            backward_comm = 2 * ring_fraction(reduce_ranks) * local * GRADIENT_BYTES / _bandwidth(gpu, gpus, assumptions)
            backward_comm += units * _latency(gpu, reduce_ranks, gpus, assumptions)
        else:
            forward_comm = gather_s
            backward_comm = ring_fraction(shards) * local * GRADIENT_BYTES / _bandwidth(gpu, shards * tp, assumptions) + shard_latency
            backward_comm += gather_s if component.sharding == "zero3" else 0.0
            if replicas > 1:
                backward_comm += 2 * ring_fraction(replicas) * local / shards * GRADIENT_BYTES / _bandwidth(gpu, gpus, assumptions)
                backward_comm += units * _latency(gpu, replicas, gpus, assumptions)
        exposed = sum(
            max(comm / units, comm - overlap * pass_s)
            for comm, pass_s in ((forward_comm, forward_s), (backward_comm, backward_s))
        )
        if workload.reference_model:  # its forward: a third of the training FLOPs, its zero3 gathers behind it
            reference_gather = (ring_fraction(dp_shard) * local * COMPUTE_PARAM_BYTES / _bandwidth(gpu, dp_shard * tp, assumptions)
                                + units * _latency(gpu, dp_shard, dp_shard * tp, assumptions))
            reference_s += compute / 3 + max(reference_gather / units, reference_gather - overlap * compute / 3)
        costs[name] = ComponentCost(
            parameters_bytes=local / shards * MASTER_PARAM_BYTES + gathered * COMPUTE_PARAM_BYTES,
            gradients_bytes=local / shards * GRADIENT_BYTES + max(root, block) * UNSHARDED_GRADIENT_BYTES,
            optimizer_bytes=local / shards * ADAM_STATE_BYTES,
            activations_bytes=_activations(shape, name, component, tp, workload, cp),
            compute_s=forward_s + backward_s,
            communication_s=forward_comm + backward_comm,
            exposed_communication_s=exposed,
        )

    tensor_parallel_s = 0.0
    if tp > 1:  # two all-reduces a layer in forward, two in backward, two more when the forward is recomputed
        all_reduces = shape.layers * (6 if plan.language.activation_checkpointing else 4)
        size = workload.tokens_per_pack / cp * shape.hidden * ACTIVATION_BYTES
        per_micro_batch = all_reduces * (2 * ring_fraction(tp) * size / _bandwidth(gpu, tp, assumptions) + _latency(gpu, tp, tp, assumptions))
        tensor_parallel_s = per_micro_batch * workload.micro_batches
    context_parallel_s = 0.0
    if cp > 1:  # on the critical path: 4 all-to-alls a layer and pass, the rows' gather and its reduction
        passes = 3 if plan.language.activation_checkpointing else 2
        collectives = 4 * shape.layers * passes + 2
        per_micro_batch = (context_parallel_bytes(shape, plan, workload) / _bandwidth(gpu, cp * tp, assumptions)
                           + collectives * _latency(gpu, cp, cp * tp, assumptions))
        context_parallel_s = per_micro_batch * workload.micro_batches
    optimizer_s = optimizer_parameters * OPTIMIZER_HBM_BYTES / gpu.hbm_bandwidth
    per_micro_batch = sum(cost.compute_s + cost.exposed_communication_s for cost in costs.values())
    reference_s *= workload.micro_batches
    step_s = per_micro_batch * workload.micro_batches + tensor_parallel_s + context_parallel_s + optimizer_s + reference_s
    reference_bytes = reference_memory_bytes(shape, plan, gpus) if workload.reference_model else 0.0
    model_flops_per_gpu = flops["total"] * workload.micro_batches / (tp * cp)
    return PlanCost(
        plan=plan,
        components=costs,
        micro_batches=workload.micro_batches,
        tensor_parallel_s=tensor_parallel_s,
        optimizer_s=optimizer_s,
        step_s=step_s,
        memory_bytes=sum(cost.memory_bytes for cost in costs.values()) + reference_bytes,
        memory_budget_bytes=gpu.hbm_bytes * assumptions.memory_fraction,
        tokens_per_s_per_gpu=workload.tokens_per_pack * workload.micro_batches / (tp * cp) / step_s,
        mfu=model_flops_per_gpu / step_s / gpu.peak_bf16_flops,
        model_flops_per_gpu=model_flops_per_gpu,
        context_parallel_s=context_parallel_s,
        reference_bytes=reference_bytes,
        reference_s=reference_s,
    )
