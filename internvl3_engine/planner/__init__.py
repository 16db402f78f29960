"""The parallelism planner: per-component plans for training an InternVL model on N GPUs, from a cost model
of memory per GPU and step time (``python -m internvl3_engine.planner``)."""

from .calibration import DEFAULT_EFFICIENCY, Calibration, calibrate
from .cost import Assumptions, ComponentCost, PlanCost, Workload, estimate, reference_memory_bytes, start_memory_bytes
from .flops import training_flops
from .hardware import GPU, GPUS, datasheet_bf16_flops
from ..architectures import PRESETS, preset_config
from .search import Recommendation, recommend
from .shape import ComponentShape, ModelShape, model_shape

__all__ = [
    "DEFAULT_EFFICIENCY",
    "GPU",
    "GPUS",
    "PRESETS",
    "Assumptions",
    "Calibration",
    "ComponentCost",
    "ComponentShape",
    "ModelShape",
    "PlanCost",
    "Recommendation",
    "Workload",
    "calibrate",
    "datasheet_bf16_flops",
    "estimate",
    "model_shape",
    "preset_config",
    "recommend",
    "reference_memory_bytes",
    "start_memory_bytes",
    "training_flops",
]
