"""The kernel suite: each op of internvl3_engine's public API, at InternVL3's shapes ('real') or small ones
('tiny'), on every backend, forward and (where differentiable) forward+backward.

An op is described once (``OpSpec``: how to build random inputs, how many bytes it must move); a case is
an op with its sizes (``Case``). Bytes moved are the minimum traffic the op needs (every input byte it must
read once plus every output byte written once), computed from the shapes and dtypes; GB/s against the
copy ceiling then says how close a kernel is to the memory roofline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

import internvl3_engine

from .harness import Timer, gb_per_s, input_copies, nbytes, rotating

BACKENDS = ("torch", "triton", "cuda")
FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"
VOCAB = 151_674  # Qwen2.5's vocabulary (labels are drawn from it)
IGNORE_INDEX = -100
STATS_BYTES = 2 * 4  # LayerNorm's float32 mean and rstd per row


@dataclass(frozen=True)
class OpSpec:
    """One public op. ``make(device, dtype, generator, **params)`` returns its positional arguments
    (random data); ``bytes_moved(args)`` returns (forward bytes, backward bytes or None);
    ``differentiable`` lists the argument positions that receive gradients (empty: forward only)."""

    name: str
    make: Callable[..., tuple]
    bytes_moved: Callable[[tuple], tuple[int, int | None]]
    differentiable: tuple[int, ...] = ()

    def function(self) -> Callable | None:
        return getattr(internvl3_engine, self.name, None)


@dataclass(frozen=True)
class Case:
    spec: OpSpec
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.params.items())


# ---- random inputs -------------------------------------------------------------------------------------

def _randn(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator).to(dtype)


def _visual_mask(tokens: int, images: int, image_tokens: int, device, generator) -> torch.Tensor:
    """bool [tokens]: ``images`` runs of ``image_tokens`` visual tokens, one at a random place in each of
    ``images`` equal stretches of the pack."""
    stride = tokens // images
    offsets = torch.randint(0, stride - image_tokens + 1, (images,), device=device, generator=generator)
    starts = torch.arange(images, device=device) * stride + offsets
    mask = torch.zeros(tokens, dtype=torch.bool, device=device)
    mask[(starts[:, None] + torch.arange(image_tokens, device=device)).flatten()] = True
    return mask


def _cu_seqlens(tokens: int, segments: int, device, generator) -> torch.Tensor:
    """int32 [segments + 1]: a pack of ``tokens`` cut at random into ``segments`` non-empty segments."""
    cuts = torch.randperm(tokens - 1, device=device, generator=generator)[: segments - 1] + 1
    ends = torch.tensor([0, tokens], device=device)
    return torch.cat([ends[:1], cuts.sort().values, ends[1:]]).to(torch.int32)


def _make_rotary(device, dtype, generator, tokens, heads, head_dim):
    x = _randn((tokens, heads, head_dim), dtype, device, generator)
    positions = torch.rand(tokens, device=device, generator=generator) * tokens
    return x, positions, 1e6, head_dim


def _make_unshuffle(device, dtype, generator, tiles, side, channels):
    return (_randn((tiles, side, side, channels), dtype, device, generator),)


def _make_unshuffle_layernorm(device, dtype, generator, tiles, side, channels):
    (x,) = _make_unshuffle(device, dtype, generator, tiles, side, channels)
    weight = 1 + 0.1 * _randn(4 * channels, dtype, device, generator)
    bias = 0.1 * _randn(4 * channels, dtype, device, generator)
    return x, weight, bias


def _make_scatter(device, dtype, generator, tokens, channels, images, image_tokens):
    is_visual = _visual_mask(tokens, images, image_tokens, device, generator)
    text = _randn((tokens, channels), dtype, device, generator)
    visual = _randn((images * image_tokens, channels), dtype, device, generator)
    return text, visual, is_visual


def _make_loss_weights(device, dtype, generator, tokens, segments, mode):
    labels = torch.randint(0, VOCAB, (tokens,), device=device, generator=generator)
    unsupervised = torch.rand(tokens, device=device, generator=generator) < 0.4  # prompt and image tokens
    labels = labels.masked_fill(unsupervised, IGNORE_INDEX)
    return labels, _cu_seqlens(tokens, segments, device, generator), mode


def _make_v2pe(device, dtype, generator, tokens, segments, images, image_tokens, delta):
    is_visual = _visual_mask(tokens, images, image_tokens, device, generator)
    return is_visual, _cu_seqlens(tokens, segments, device, generator), delta


# ---- bytes moved (read + written) ----------------------------------------------------------------------

def _rotary_bytes(args):
    # forward: read x and positions, write the rotated x; backward: the same for the gradient.
    x, positions, _, rotary_dim = args
    moved = 2 * nbytes(x) + nbytes(positions) + 4 * rotary_dim // 2
    return moved, moved


def _unshuffle_bytes(args):
    # A permutation: read x, write x's bytes; backward the inverse permutation of the gradient.
    (x,) = args
    return 2 * nbytes(x), 2 * nbytes(x)


def _unshuffle_layernorm_bytes(args):
    # forward: read x, weight, bias; write out (x's size) and the float32 mean/rstd per output row.
    # backward: read grad, x, weight, mean/rstd; write dx, dweight, dbias.
    x, weight, bias = args
    rows = x.numel() // weight.numel()
    forward = 2 * nbytes(x) + nbytes(weight, bias) + STATS_BYTES * rows
    backward = 3 * nbytes(x) + nbytes(weight) + STATS_BYTES * rows + nbytes(weight, bias)
    return forward, backward


def _scatter_bytes(args):
    # forward: read the text rows that stay, the visual rows and the mask; write every output row.
    # backward: read grad and the mask; write grad_text [T, C] and grad_visual [V, C].
    text, visual, is_visual = args
    forward = (nbytes(text) - nbytes(visual)) + nbytes(visual) + nbytes(is_visual) + nbytes(text)
    backward = nbytes(text) + nbytes(is_visual) + nbytes(text) + nbytes(visual)
    return forward, backward


def _loss_weights_bytes(args):
    # read labels and cu_seqlens; write one float32 weight per token.
    labels, cu_seqlens, _ = args
    return nbytes(labels, cu_seqlens) + 4 * labels.numel(), None


def _v2pe_bytes(args):
    # read the mask and cu_seqlens; write one float32 position per token.
    is_visual, cu_seqlens, _ = args
    return nbytes(is_visual, cu_seqlens) + 4 * is_visual.numel(), None


ROTARY = OpSpec("apply_rotary", _make_rotary, _rotary_bytes, differentiable=(0,))
PIXEL_UNSHUFFLE = OpSpec("pixel_unshuffle", _make_unshuffle, _unshuffle_bytes, differentiable=(0,))
PIXEL_UNSHUFFLE_LAYERNORM = OpSpec(
    "pixel_unshuffle_layernorm", _make_unshuffle_layernorm, _unshuffle_layernorm_bytes, differentiable=(0, 1, 2)
)
SCATTER_VISUAL = OpSpec("scatter_visual", _make_scatter, _scatter_bytes, differentiable=(0, 1))
LOSS_WEIGHTS = OpSpec("loss_weights", _make_loss_weights, _loss_weights_bytes)
V2PE_POSITION_IDS = OpSpec("v2pe_position_ids", _make_v2pe, _v2pe_bytes)
OPS = (ROTARY, PIXEL_UNSHUFFLE, PIXEL_UNSHUFFLE_LAYERNORM, SCATTER_VISUAL, LOSS_WEIGHTS, V2PE_POSITION_IDS)

# InternVL3 shapes (internvl3-facts.md): Qwen2.5-7B's 28 query heads of 128 over a 16k pack; InternViT-300M
# (1024 channels, 16 tiles) and InternViT-6B (3200 channels, 8 tiles) at 32x32 patches per 448px tile;
# 12 tiles of 256 visual tokens scattered into a 16k pack of 3584-wide embeddings; ~30 samples per pack.
SIZES: dict[str, list[Case]] = {
    "real": [
        Case(ROTARY, dict(tokens=16384, heads=28, head_dim=128)),
        Case(PIXEL_UNSHUFFLE, dict(tiles=16, side=32, channels=1024)),
        Case(PIXEL_UNSHUFFLE, dict(tiles=8, side=32, channels=3200)),
        Case(PIXEL_UNSHUFFLE_LAYERNORM, dict(tiles=16, side=32, channels=1024)),
        Case(PIXEL_UNSHUFFLE_LAYERNORM, dict(tiles=8, side=32, channels=3200)),
        Case(SCATTER_VISUAL, dict(tokens=16384, channels=3584, images=12, image_tokens=256)),
        Case(LOSS_WEIGHTS, dict(tokens=16384, segments=30, mode="square")),
        Case(V2PE_POSITION_IDS, dict(tokens=16384, segments=30, images=12, image_tokens=256, delta=0.0625)),
    ],
    "tiny": [
        Case(ROTARY, dict(tokens=64, heads=2, head_dim=32)),
        Case(PIXEL_UNSHUFFLE, dict(tiles=2, side=8, channels=16)),
        Case(PIXEL_UNSHUFFLE_LAYERNORM, dict(tiles=2, side=8, channels=16)),
        Case(SCATTER_VISUAL, dict(tokens=128, channels=32, images=2, image_tokens=16)),
        Case(LOSS_WEIGHTS, dict(tokens=256, segments=4, mode="square")),
        Case(V2PE_POSITION_IDS, dict(tokens=256, segments=4, images=2, image_tokens=16, delta=0.0625)),
    ],
}


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on the GPU (training precision); float32 on the CPU, where the Triton interpreter's
    bfloat16 is broken and CPU bfloat16 timings would mean nothing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---- running ------------------------------------------------------------------------------------------

def _forward(function: Callable, args: tuple):
    return function(*args)


def _forward_backward(function: Callable, spec: OpSpec, args: tuple, grads: tuple):
    outputs = function(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return torch.autograd.grad(outputs, [args[i] for i in spec.differentiable], grads)


def _with_grad(spec: OpSpec, args: tuple) -> tuple:
    return tuple(a.detach().requires_grad_() if i in spec.differentiable else a for i, a in enumerate(args))


def _output_grads(function: Callable, args: tuple, generator) -> tuple:
    outputs = function(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return tuple(torch.randn(o.shape, device=o.device, generator=generator).to(o.dtype) for o in outputs)


def skip_reason(spec: OpSpec, backend: str, device: torch.device) -> str | None:
    """Why (op, backend) is not timed at all, before trying it; None when it should be tried."""
    if spec.function() is None:
        return f"internvl3_engine has no public {spec.name} yet"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton on CPU tensors needs TRITON_INTERPRET=1 (set it to time the interpreter)"
    return None


@dataclass
class Job:
    case: Case
    direction: str
    backend: str


def jobs(cases: list[Case]) -> Iterator[Job]:
    for case in cases:
        directions = (FORWARD, FORWARD_BACKWARD) if case.spec.differentiable else (FORWARD,)
        for direction in directions:
            for backend in BACKENDS:
                yield Job(case, direction, backend)


class KernelSuite:
    """Times jobs; builds each case's rotated input copies once and shares them across its jobs."""

    def __init__(self, device: torch.device, dtype: torch.dtype, timer: Timer, seed: int = 0):
        self.device, self.dtype, self.timer = device, dtype, timer
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._inputs: tuple[Case, list[tuple]] | None = None

    def _input_sets(self, case: Case) -> list[tuple]:
        if self._inputs is None or self._inputs[0] is not case:
            self._inputs = None  # free the previous case's copies before building these
            first = case.spec.make(self.device, self.dtype, self.generator, **case.params)
            set_bytes = nbytes(*(a for a in first if isinstance(a, torch.Tensor)))
            copies = input_copies(3 * set_bytes, self.device)  # inputs, output and gradients per call
            rest = [case.spec.make(self.device, self.dtype, self.generator, **case.params) for _ in range(copies - 1)]
            self._inputs = (case, [first, *rest])
        return self._inputs[1]

    def run(self, job: Job) -> dict:
        spec = job.case.spec
        row = {"op": spec.name, "case": job.case.label, "params": job.case.params, "backend": job.backend,
               "direction": job.direction, "dtype": str(self.dtype).removeprefix("torch.")}
        reason = skip_reason(spec, job.backend, self.device)
        if reason is not None:
            return {**row, "status": "skipped", "reason": reason}
        sets = self._input_sets(job.case)
        forward_bytes, backward_bytes = spec.bytes_moved(sets[0])
        function = spec.function()
        try:
            with internvl3_engine.backend(job.backend):
                call = self._callable(function, spec, sets, job.direction)
                call()  # fails here when the backend cannot run this op on this device
                median_ms = self.timer.median_ms(call)
        except RuntimeError as error:  # the backend cannot run here (dispatch says why)
            return {**row, "status": "skipped", "reason": f"{type(error).__name__}: {error}"}
        except Exception as error:  # a broken op must not stop the others: recorded, and the run fails
            return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}
        moved = forward_bytes + (backward_bytes if job.direction == FORWARD_BACKWARD else 0)
        return {**row, "status": "ok", "median_ms": median_ms, "bytes": moved, "input_copies": len(sets)}

    def _callable(self, function: Callable, spec: OpSpec, sets: list[tuple], direction: str) -> Callable:
        if direction == FORWARD:
            return rotating(lambda args: _forward(function, args), sets)
        with_grad = [_with_grad(spec, args) for args in sets]
        grads = [_output_grads(function, args, self.generator) for args in with_grad]
        return rotating(lambda pair: _forward_backward(function, spec, *pair), list(zip(with_grad, grads)))


def run_kernels(device: torch.device, sizes: str, timer: Timer, progress: Callable = iter) -> list[dict]:
    suite = KernelSuite(device, default_dtype(device), timer)
    return [suite.run(job) for job in progress(list(jobs(SIZES[sizes])))]


def add_rates(rows: list[dict], copy_gb_per_s: float) -> list[dict]:
    """Add GB/s, the fraction of the copy ceiling and the speedup over the 'torch' backend to timed rows."""
    torch_ms = {(r["op"], r["case"], r["direction"]): r["median_ms"]
                for r in rows if r["backend"] == "torch" and r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        row["gb_per_s"] = gb_per_s(row["bytes"], row["median_ms"])
        row["fraction_of_copy"] = row["gb_per_s"] / copy_gb_per_s
        baseline = torch_ms.get((row["op"], row["case"], row["direction"]))
        row["speedup_vs_torch"] = None if baseline is None else baseline / row["median_ms"]
    return rows
