"""Timing, device description and run records shared by the benchmark suites."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import internvl3_engine

RECORD_SCHEMA = 1
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device does not report its own
MAX_INPUT_COPIES = 4096
CPU_WARMUP_CALLS = 2
CPU_TIME_BUDGET_S = 0.5  # per measurement: CPU numbers are a smoke test, not a result
CPU_REPEATS = (3, 50)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def gb_per_s(num_bytes: int, median_ms: float) -> float:
    return num_bytes / (median_ms * 1e-3) / 1e9


class Timer:
    """Median wall time of a callable in milliseconds.

    CUDA: triton.testing.do_bench (its warm-up, an L2 flush before every call, CUDA events, median).
    CPU: time.perf_counter around each call after warm-up, repeats sized to a small time budget.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "triton.testing.do_bench(warmup=25 ms, rep=100 ms, return_mode='median'), L2 flushed per call"
        return f"time.perf_counter median after {CPU_WARMUP_CALLS} warm-up calls, {CPU_TIME_BUDGET_S} s budget"

    def median_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return self._cpu_median_ms(fn)

    @staticmethod
    def _cpu_median_ms(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(CPU_WARMUP_CALLS):
            fn()
        per_call = max((time.perf_counter() - start) / CPU_WARMUP_CALLS, 1e-9)
        repeats = min(max(int(CPU_TIME_BUDGET_S / per_call), CPU_REPEATS[0]), CPU_REPEATS[1])
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def input_copies(set_bytes: int, device: torch.device) -> int:
    """How many copies of one input set to rotate through so that together they exceed twice the L2:
    a call then never finds its inputs left in L2 by the previous call. One copy on the CPU."""
    if device.type != "cuda":
        return 1
    return min(max(math.ceil(2 * l2_bytes(device) / max(set_bytes, 1)), 2), MAX_INPUT_COPIES)


def rotating(call: Callable, items: Sequence) -> Callable[[], object]:
    """A no-argument callable applying ``call`` to the next of ``items`` in turn."""
    cycle = itertools.cycle(items)
    return lambda: call(next(cycle))


def _nvml_info(index: int) -> dict:
    """Clocks, memory, power limit and driver of GPU ``index`` through NVML; {'nvml_error': ...} without it."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no nvidia-ml-py, no driver
        return {"nvml_error": f"{type(error).__name__}: {error}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        queries = {
            "driver": lambda: pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "memory_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "memory_total_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        info = {}
        for key, query in queries.items():
            try:
                value = query()
                info[key] = value.decode() if isinstance(value, bytes) else value
            except pynvml.NVMLError as error:  # a query this GPU or driver does not support
                info[key] = None
                info.setdefault("nvml_unsupported", []).append(f"{key}: {error}")
        return info
    finally:
        pynvml.nvmlShutdown()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    cpu = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type != "cuda":
        return {"type": "cpu", "name": cpu["cpu"], **cpu}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2_bytes(torch.device("cuda", index)),
        **_nvml_info(index),
        **cpu,
    }


def device_slug(info: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-") or info["type"]


def versions() -> dict:
    return {"python": platform.python_version(), "internvl3_engine": internvl3_engine.info()}


def environment() -> dict:
    """The environment variables that change what runs."""
    names = ("TRITON_INTERPRET", "INTERNVL3_ENGINE_BACKEND", "CUDA_VISIBLE_DEVICES")
    return {name: os.environ.get(name) for name in names}


def command_line() -> str:
    return shlex.join(getattr(sys, "orig_argv", sys.argv))


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def record_stem(when: datetime.datetime, info: dict, suite: str, sizes: str) -> str:
    return f"{when.strftime('%Y%m%dT%H%M%SZ')}_{device_slug(info)}_{suite}-{sizes}"


def write_record(record: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
