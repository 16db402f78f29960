"""``internvl3_engine.info()``: versions, the compiled extension, and the GPU."""

from __future__ import annotations

import torch

from .dispatch import get_backend, triton_import_error
from .extension import extension_available, extension_cuda_archs, extension_has_cuda, extension_load_error
from .version import __version__


def _gpu_names() -> list[str]:
    """GPU names through NVML (nvidia-ml-py); empty where there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        names = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            names.append(name.decode() if isinstance(name, bytes) else name)
        return names
    finally:
        pynvml.nvmlShutdown()


def info() -> dict:
    """What this installation has: versions, extension variants, GPU archs and names, backend."""
    triton_error = triton_import_error()
    triton_version = None
    if triton_error is None:
        import triton

        triton_version = triton.__version__
    gpus = _gpu_names()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension_cpu": extension_available(),
        "extension_cuda": extension_has_cuda(),
        "extension_error": extension_load_error(),
        "cuda_archs": extension_cuda_archs(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpus[0] if gpus else None,
        "gpus": gpus,
        "backend": get_backend(),
    }
