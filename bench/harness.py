"""Timing, device description, run records and the declarative case model shared by the benchmark suites."""

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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import internvl3_engine

RECORD_SCHEMA = 2
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device does not report its own
MAX_INPUT_COPIES = 4096
CPU_WARMUP_CALLS = 2
CPU_TIME_BUDGET_S = 0.5  # per measurement: CPU numbers are a smoke test, not a result
CPU_REPEATS = (3, 50)
GPU_BENCH_MS = {"full": (25, 100), "quick": (5, 20)}  # do_bench (warmup, rep) in milliseconds


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def gb_per_s(num_bytes: int, median_ms: float) -> float:
    return num_bytes / (median_ms * 1e-3) / 1e9


def tflop_per_s(flops: float, median_ms: float) -> float:
    return flops / (median_ms * 1e-3) / 1e12


class Timer:
    """Median wall time of a callable in milliseconds.

    CUDA: triton.testing.do_bench (its warm-up, an L2 flush before every call, CUDA events, median).
    CPU: time.perf_counter around each call after warm-up, repeats sized to a small time budget.
    ``quick``: a smoke test of the harness (CI): on CPU one timed call (callers have made one untimed call
    already), on CUDA do_bench with 5 ms of warm-up and 20 ms of repeats.
    """

    def __init__(self, device: torch.device, quick: bool = False):
        self.device = device
        self.quick = quick

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            warmup, rep = GPU_BENCH_MS["quick" if self.quick else "full"]
            return f"triton.testing.do_bench(warmup={warmup} ms, rep={rep} ms, return_mode='median'), L2 flushed per call"
        if self.quick:
            return "time.perf_counter of one call after one untimed call (quick: a smoke test)"
        return f"time.perf_counter median after {CPU_WARMUP_CALLS} warm-up calls, {CPU_TIME_BUDGET_S} s budget"

    def median_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            import triton.testing

            warmup, rep = GPU_BENCH_MS["quick" if self.quick else "full"]
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        if self.quick:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
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


DEVICE_TIME_CALLS = 10


def gpu_busy_us(events, kernel: str | None = None) -> float:
    """Summed durations (us) of the GPU activities (kernels, copies, memsets) among torch.profiler events;
    ``kernel``: only those whose name contains it."""
    return sum(event.time_range.elapsed_us() for event in events
               if event.device_type == torch.autograd.DeviceType.CUDA and (kernel is None or kernel in event.name))


def device_ms(device: torch.device, fn: Callable[[], object], calls: int = DEVICE_TIME_CALLS,
              kernel: str | None = None) -> float | None:
    """CUDA: the GPU's own time per call of ``fn`` in milliseconds, the summed durations of the kernels, copies
    and memsets it runs (torch.profiler over ``calls`` calls after one untimed call), without the host's time
    between them (Python, dispatch, launches). The wall time (Timer) includes that time whenever the host
    cannot run ahead of the GPU, as with short kernels; the difference is the host overhead. ``kernel``: only
    the activities whose name contains it. None elsewhere."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    return gpu_busy_us(profile.events(), kernel) / calls / 1e3


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


def peak_memory(device: torch.device, fn: Callable[[], object]) -> dict:
    """CUDA: one call of ``fn`` after torch.cuda.reset_peak_memory_stats: ``peak_memory_bytes`` (what
    max_memory_allocated reports, inputs included) and ``workspace_bytes`` (the peak above what was allocated
    before the call: the call's own memory). {} on other devices."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_memory_bytes": peak, "workspace_bytes": peak - before}


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
            "nvml_name": lambda: pynvml.nvmlDeviceGetName(handle),
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
    # default=str: case parameters that are small objects (a segment mix) are written as their description.
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def provenance(record: dict) -> str:
    """A measurement table's line saying when, on what and by which command it was measured."""
    return (f"{record['date']}, {record['device']['name']}, torch {record['versions']['internvl3_engine']['torch']}; "
            f"`{record['command']}`")


def write_record_and_table(record: dict, table: str, stem: Path, prog: str) -> None:
    """A measurement script's record as ``stem``.json and its markdown ``table`` as ``stem``.md; the table is
    printed, and where both went (on stderr, as ``prog``)."""
    write_record(record, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"{prog}: wrote {stem}.json and .md", file=sys.stderr)


# ---- the declarative case model: an op (OpSpec), its sizes (Case), the ways to compute it (Implementation)

def randn(shape, dtype: torch.dtype, device, generator) -> torch.Tensor:
    """Standard normal values drawn in float32 (the same numbers for every dtype), cast to ``dtype``."""
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator).to(dtype)


def _no_context(args: tuple, options: dict) -> None:
    return None


def _always_available(case: "Case", device: torch.device, dtype: torch.dtype) -> None:
    return None


@dataclass(frozen=True)
class Implementation:
    """One row of a case: a way to compute the op (an engine backend, or a baseline from another library).

    ``call(context, *args, **options)`` computes it from the op's positional arguments and the case's keyword
    options; ``prepare(args, options)`` builds its ``context`` once per input set, outside the timing (host
    segment lengths, a block mask: what a training step builds once per batch and reuses across layers);
    ``backend`` is the engine backend selected around the call (None: left as it is, 'auto' unless
    INTERNVL3_ENGINE_BACKEND says otherwise); ``unavailable(case, device, dtype)`` says why it cannot run
    here, before anything is built (None: try it)."""

    name: str
    call: Callable[..., object]
    backend: str | None = None
    prepare: Callable[[tuple, dict], object] = _no_context
    unavailable: Callable[["Case", torch.device, torch.dtype], str | None] = _always_available

    def selected(self):
        """The context manager selecting this row's engine backend."""
        return nullcontext() if self.backend is None else internvl3_engine.backend(self.backend)


def engine(op: str, backend: str, label: str | None = None,
           unavailable: Callable[["Case", torch.device, torch.dtype], str | None] = _always_available,
           **options) -> Implementation:
    """internvl3_engine's public ``op`` on engine ``backend`` with extra keyword ``options`` (e.g. a
    rotary_mode), labelled ``label`` (default: the backend); ``unavailable`` adds a reason of the op's own."""

    def call(_context, *args, **case_options):
        return getattr(internvl3_engine, op)(*args, **case_options, **options)

    def why_not(case: "Case", device: torch.device, dtype: torch.dtype) -> str | None:
        if not hasattr(internvl3_engine, op):
            return f"internvl3_engine has no public {op} yet"
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on CPU tensors needs TRITON_INTERPRET=1 (set it to time the interpreter)"
        return unavailable(case, device, dtype)

    return Implementation(label or backend, call, backend=backend, unavailable=why_not)


ENGINE_BACKENDS = ("torch", "triton", "cuda")


def engine_backends(case: "Case") -> list[Implementation]:
    """The default rows of an op: internvl3_engine on every backend ('torch' = the PyTorch reference)."""
    return [engine(case.spec.name, backend) for backend in ENGINE_BACKENDS]


@dataclass(frozen=True)
class OpSpec:
    """One public op. ``make(device, dtype, generator, **params)`` returns its positional arguments (random
    data); ``bytes_moved(args)`` returns (forward bytes, backward bytes or None) for memory-bound ops;
    ``flops(args, **options)`` returns (forward FLOPs, backward FLOPs or None) for compute-bound ops;
    ``differentiable`` lists the argument positions that receive gradients (empty: forward only);
    ``implementations(case)`` lists the rows timed for a case (default: every engine backend)."""

    name: str
    make: Callable[..., tuple]
    bytes_moved: Callable[[tuple], tuple[int, int | None]] | None = None
    differentiable: tuple[int, ...] = ()
    flops: Callable[..., tuple[float, float | None]] | None = None
    implementations: Callable[["Case"], Sequence[Implementation]] = engine_backends


@dataclass(frozen=True)
class Case:
    """An op at one size: ``params`` go to its ``make``, ``options`` are the op's keyword arguments (the same
    for every implementation), ``name`` a short title."""

    spec: OpSpec
    params: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    name: str = ""

    @property
    def label(self) -> str:
        words = " ".join(f"{key}={value}" for key, value in {**self.params, **self.options}.items())
        return f"{self.name}: {words}" if self.name else words
