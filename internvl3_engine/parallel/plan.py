"""What to do with each component: the parallelism plan, as data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

SHARDINGS = ("replicate", "zero2", "zero3")
COMPONENTS = ("vision", "projector", "language")  # in forward execution order
# The dtype names a plan file may use for param_dtype / reduce_dtype.
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class ComponentPlan:
    """How one component (ViT, projector or LLM) is parallelised over the data-parallel ranks.

    sharding: "replicate" (every rank keeps the whole component; gradients all-reduced, as DDP),
      "zero2" (FSDP2 sharding that keeps parameters gathered from forward to backward: no second
      all-gather, more memory) or "zero3" (FSDP2 resharding after forward: least memory).
    param_dtype / reduce_dtype: FSDP2 mixed precision (None keeps the parameters' dtype).
    activation_checkpointing: recompute each block's activations in backward.
    compile: torch.compile each block.
    """

    sharding: str = "zero3"
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise TypeError(f"{name} must be a floating torch.dtype or None, got {value!r}")


@dataclass(frozen=True)
class ParallelPlan:
    """Per-component plans plus the mesh shape.

    dp_replicate: number of replica groups (HSDP: FSDP shards within a group of world/dp_replicate ranks
      and replicates across groups); 1 shards over the whole world.
    tp: tensor-parallel degree of the LLM's blocks (Megatron-style: q/k/v and gate/up split by output
      columns, o/down by input rows; it must divide the LLM's query and key-value head counts).
    cp: context-parallel degree: each pack's tokens are split over cp ranks, the LLM's attention by
      Ulysses all-to-all (parallel/context.py; cp must divide the LLM's query heads per tensor-parallel
      rank, and it and the key-value heads must divide one another). The weights are sharded over the
      data-parallel and cp ranks together, so cp ranks hold no duplicate shards.
    The world is laid out (dp_replicate, dp_shard, cp, tp) with tp innermost, so tensor-parallel peers are
    neighbouring ranks (one node); tensor- and context-parallel peers hold the same micro-batches.
    prefetch: how many FSDP modules ahead (in forward and backward execution order, across component
      boundaries) to all-gather explicitly; 0 leaves FSDP2's default (the next module in backward only).

    The defaults follow InternVL3's observation that the components want different treatment: the small
    ViT and projector are cheap to keep gathered (zero2 / replicate), the LLM is sharded fully (zero3).
    """

    vision: ComponentPlan = field(default_factory=lambda: ComponentPlan(sharding="zero2"))
    projector: ComponentPlan = field(default_factory=lambda: ComponentPlan(sharding="replicate"))
    language: ComponentPlan = field(default_factory=lambda: ComponentPlan(sharding="zero3"))
    dp_replicate: int = 1
    tp: int = 1
    cp: int = 1
    prefetch: int = 1

    def __post_init__(self):
        for name in COMPONENTS:
            if not isinstance(getattr(self, name), ComponentPlan):
                raise TypeError(f"{name} must be a ComponentPlan, got {type(getattr(self, name)).__name__}")
        for name in ("dp_replicate", "tp", "cp", "prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "prefetch" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'prefetch' else 1}, got {value!r}")

    def check_world_size(self, world: int) -> None:
        """ValueError unless ``world`` ranks can hold the plan (dp_replicate * cp * tp must divide it)."""
        if world % (self.dp_replicate * self.cp * self.tp):
            raise ValueError(f"dp_replicate * cp * tp = {self.dp_replicate} * {self.cp} * {self.tp} must divide the world size {world}")

    def component(self, name: str) -> ComponentPlan:
        return getattr(self, name)

    def to_dict(self) -> dict:
        """The plan as plain data (a YAML/JSON plan file's contents): dtypes by name ("bfloat16")."""

        def component(name: str) -> dict:
            fields = dataclasses.asdict(self.component(name))
            return {key: str(value).removeprefix("torch.") if key.endswith("dtype") and value is not None else value
                    for key, value in fields.items()}

        return {**{name: component(name) for name in COMPONENTS},
                "dp_replicate": self.dp_replicate, "tp": self.tp, "cp": self.cp, "prefetch": self.prefetch}

    @classmethod
    def from_dict(cls, data: dict) -> "ParallelPlan":
        """The plan of ``to_dict``'s data (a plan file's): fields left out keep their defaults, dtypes are
        names of DTYPES; a ValueError or TypeError names a wrong field."""
        _check_fields(cls, data, "a plan is", "unknown plan fields")
        settings = {}
        for key, value in data.items():
            if key in COMPONENTS:
                settings[key] = _component_from_dict(key, value)
            else:
                settings[key] = value
        return cls(**settings)


def _check_fields(cls, data, what: str, unknown_message: str) -> None:
    """TypeError unless ``data`` is a mapping; ValueError naming its keys that are not fields of ``cls``."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} a mapping of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{unknown_message} {unknown}; known: {sorted(known)}")


def _component_from_dict(name: str, data) -> ComponentPlan:
    _check_fields(ComponentPlan, data, f"{name} must be", f"{name}: unknown ComponentPlan fields")
    settings = dict(data)
    for key in ("param_dtype", "reduce_dtype"):
        if isinstance(settings.get(key), str):
            if settings[key] not in DTYPES:
                raise ValueError(f"{name}.{key} must be one of {sorted(DTYPES)}, got {settings[key]!r}")
            settings[key] = DTYPES[settings[key]]
    return ComponentPlan(**settings)
