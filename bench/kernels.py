"""The kernel suite: each op of internvl3_engine's public API, at InternVL3's shapes ('real') or small ones
('tiny'), on every engine backend and against baselines from other libraries, forward and (where
differentiable) forward+backward.

An op is described once (``OpSpec``: how to build random inputs, how many bytes it must move or how many
FLOPs it does, which implementations to time); a case is an op with its sizes (``Case``); each
implementation of a case is one row (``Implementation``: an engine backend or a baseline). Bytes moved are
the minimum traffic the op needs (every input byte read once plus every output byte written once); GB/s
against the copy ceiling says how close a memory-bound kernel is to the roofline. Compute-bound ops
(attention, the LLM head's cross-entropy) count FLOPs instead, reported as TFLOP/s against the matmul
ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


from . import attention
from .harness import (
    Case, Implementation, OpSpec, Timer, device_ms, engine, gb_per_s, input_copies, nbytes, peak_memory, randn, rotating,
    tflop_per_s,
)

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"
VOCAB = 151_674  # Qwen2.5's vocabulary (labels are drawn from it)
IGNORE_INDEX = -100
STATS_BYTES = 2 * 4  # LayerNorm's float32 mean and rstd per row
LOGITS_MEMORY_FRACTION = 0.4  # a full-logits implementation runs when its logits fit in this much free memory


# ---- random inputs -------------------------------------------------------------------------------------

def _visual_mask(tokens: int, images: int, image_tokens: int, device, generator) -> torch.Tensor:
    """bool [tokens]: ``images`` runs of ``image_tokens`` visual tokens, one at a random place in each of
    ``images`` equal stretches of the pack."""
    stride = tokens // images
    offsets = torch.randint(0, stride - image_tokens + 1, (images,), device=device, generator=generator)
    starts = torch.arange(images, device=device) * stride + offsets
    mask = torch.zeros(tokens, dtype=torch.bool, device=device)
    mask[(starts[:, None] + torch.arange(image_tokens, device=device)).flatten()] = True
    return mask


def _random_labels(tokens: int, vocab: int, device, generator) -> torch.Tensor:
    """int64 [tokens] in [0, vocab), IGNORE_INDEX at ~40% of the tokens (the prompt and image tokens)."""
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    unsupervised = torch.rand(tokens, device=device, generator=generator) < 0.4
    return labels.masked_fill(unsupervised, IGNORE_INDEX)


def _cu_seqlens(tokens: int, segments: int, device, generator) -> torch.Tensor:
    """int32 [segments + 1]: a pack of ``tokens`` cut at random into ``segments`` non-empty segments."""
    cuts = torch.randperm(tokens - 1, device=device, generator=generator)[: segments - 1] + 1
    ends = torch.tensor([0, tokens], device=device)
    return torch.cat([ends[:1], cuts.sort().values, ends[1:]]).to(torch.int32)


def _make_rotary(device, dtype, generator, tokens, heads, head_dim):
    x = randn((tokens, heads, head_dim), dtype, device, generator)
    positions = torch.rand(tokens, device=device, generator=generator) * tokens
    return x, positions, 1e6, head_dim


def _make_unshuffle(device, dtype, generator, tiles, side, channels):
    return (randn((tiles, side, side, channels), dtype, device, generator),)


def _make_unshuffle_layernorm(device, dtype, generator, tiles, side, channels):
    (x,) = _make_unshuffle(device, dtype, generator, tiles, side, channels)
    weight = 1 + 0.1 * randn(4 * channels, dtype, device, generator)
    bias = 0.1 * randn(4 * channels, dtype, device, generator)
    return x, weight, bias


def _make_scatter(device, dtype, generator, tokens, channels, images, image_tokens):
    is_visual = _visual_mask(tokens, images, image_tokens, device, generator)
    text = randn((tokens, channels), dtype, device, generator)
    visual = randn((images * image_tokens, channels), dtype, device, generator)
    return text, visual, is_visual


def _make_loss_weights(device, dtype, generator, tokens, segments, mode):
    labels = _random_labels(tokens, VOCAB, device, generator)
    return labels, _cu_seqlens(tokens, segments, device, generator), mode


def _make_v2pe(device, dtype, generator, tokens, segments, images, image_tokens, delta):
    is_visual = _visual_mask(tokens, images, image_tokens, device, generator)
    return is_visual, _cu_seqlens(tokens, segments, device, generator), delta


def _make_linear_cross_entropy(device, dtype, generator, tokens, hidden, vocab):
    # weight ~ N(0, 1/hidden): logits of unit scale, as a trained head gives.
    states = randn((tokens, hidden), dtype, device, generator)
    weight = (randn((vocab, hidden), torch.float32, device, generator) / math.sqrt(hidden)).to(dtype)
    return states, weight, _random_labels(tokens, vocab, device, generator)


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


# ---- the LLM head's cross-entropy: FLOPs and the full-logits baselines ---------------------------------

def _linear_cross_entropy_flops(args, **options):
    # The head's matmuls: logits = hidden @ weight.T forward (2 T H V); d hidden and d weight backward (4 T H V).
    # The engine computes the gradients of a scalar loss inside its forward (its forward+backward row is
    # these 6 T H V); with precompute_grads=False it would recompute the logits (8 T H V, credited as 6).
    hidden, weight, _ = args
    forward = 2 * hidden.shape[0] * hidden.shape[1] * weight.shape[0]
    return forward, 2 * forward


def _logits_too_big(bytes_per_logit: int) -> Callable:
    """A reason to skip an implementation that materialises the [T, V] logits (``bytes_per_logit`` each) when
    they would exceed LOGITS_MEMORY_FRACTION of the GPU's free memory."""

    def reason(case: Case, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return None
        logits = case.params["tokens"] * case.params["vocab"] * bytes_per_logit
        free, _ = torch.cuda.mem_get_info(device)
        if logits > LOGITS_MEMORY_FRACTION * free:
            return (f"its [T, V] logits ({logits / 2**30:.1f} GiB) would exceed {LOGITS_MEMORY_FRACTION:.0%} of the "
                    f"GPU's free memory ({free / 2**30:.1f} GiB)")
        return None

    return reason


def _torch_linear_cross_entropy(_context, hidden, weight, labels, **options):
    # What a plain PyTorch training step does (transformers' ForCausalLMLoss upcasts the logits to float32).
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def _liger_loss(args, options):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")


def _liger_linear_cross_entropy(loss, hidden, weight, labels, **options):
    return loss(weight, hidden, labels)


def _liger_unavailable(case: Case, device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "Liger-Kernel runs on GPUs only"
    return attention.import_error("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")


def _linear_cross_entropy_implementations(case: Case) -> list[Implementation]:
    name = case.spec.name
    return [
        # The engine's reference materialises float32 logits (and as much again in its backward).
        engine(name, "torch", unavailable=_logits_too_big(4)),
        engine(name, "triton"),
        # The gradients from logits recomputed in the backward instead of computed in the forward.
        engine(name, "triton", label="triton-recompute", precompute_grads=False),
        Implementation("torch-linear+cross_entropy", _torch_linear_cross_entropy, unavailable=_logits_too_big(4)),
        # Liger computes the gradients inside its forward: its forward row includes the backward's work.
        Implementation("liger", _liger_linear_cross_entropy, prepare=_liger_loss, unavailable=_liger_unavailable),
    ]


ROTARY = OpSpec("apply_rotary", _make_rotary, _rotary_bytes, differentiable=(0,))
PIXEL_UNSHUFFLE = OpSpec("pixel_unshuffle", _make_unshuffle, _unshuffle_bytes, differentiable=(0,))
PIXEL_UNSHUFFLE_LAYERNORM = OpSpec(
    "pixel_unshuffle_layernorm", _make_unshuffle_layernorm, _unshuffle_layernorm_bytes, differentiable=(0, 1, 2)
)
SCATTER_VISUAL = OpSpec("scatter_visual", _make_scatter, _scatter_bytes, differentiable=(0, 1))
LOSS_WEIGHTS = OpSpec("loss_weights", _make_loss_weights, _loss_weights_bytes)
V2PE_POSITION_IDS = OpSpec("v2pe_position_ids", _make_v2pe, _v2pe_bytes)
LINEAR_CROSS_ENTROPY = OpSpec(
    "linear_cross_entropy", _make_linear_cross_entropy, differentiable=(0, 1), flops=_linear_cross_entropy_flops,
    implementations=_linear_cross_entropy_implementations,
)
V2PE_ATTENTION = attention.V2PE_ATTENTION
OPS = (ROTARY, PIXEL_UNSHUFFLE, PIXEL_UNSHUFFLE_LAYERNORM, SCATTER_VISUAL, LOSS_WEIGHTS, V2PE_POSITION_IDS,
       V2PE_ATTENTION, LINEAR_CROSS_ENTROPY)


def memory_bound_cases(*, tokens: int, heads: int, head_dim: int, tiles_and_channels: Sequence[tuple[int, int]],
                       side: int, channels: int, images: int, image_tokens: int, segments: int) -> list[Case]:
    """The memory-bound ops at one scale: the rotary of ``heads`` x ``head_dim`` over a pack of ``tokens``;
    the unshuffles of (tiles, channels) ViT outputs of ``side`` x ``side`` patches; ``images`` runs of
    ``image_tokens`` visual rows of ``channels`` scattered into the pack; the pack's loss weights and V2PE
    positions over ``segments`` samples."""
    return [
        Case(ROTARY, dict(tokens=tokens, heads=heads, head_dim=head_dim)),
        *(Case(spec, dict(tiles=tiles, side=side, channels=vit_channels))
          for spec in (PIXEL_UNSHUFFLE, PIXEL_UNSHUFFLE_LAYERNORM) for tiles, vit_channels in tiles_and_channels),
        Case(SCATTER_VISUAL, dict(tokens=tokens, channels=channels, images=images, image_tokens=image_tokens)),
        Case(LOSS_WEIGHTS, dict(tokens=tokens, segments=segments, mode="square")),
        Case(V2PE_POSITION_IDS, dict(tokens=tokens, segments=segments, images=images, image_tokens=image_tokens,
                                     delta=attention.V2PE_DELTA)),
    ]


# InternVL3 shapes (internvl3-facts.md): Qwen2.5-7B's 28 query heads of 128 over a 16k pack; InternViT-300M
# (1024 channels, 16 tiles) and InternViT-6B (3200 channels, 8 tiles) at 32x32 patches per 448px tile;
# 12 tiles of 256 visual tokens scattered into a 16k pack of 3584-wide embeddings; ~30 samples per pack;
# the LLM head of Qwen2.5-0.5B (896) and -7B (3584) over the 151,674-token vocabulary.
SIZES: dict[str, list[Case]] = {
    "real": [
        *memory_bound_cases(tokens=16384, heads=28, head_dim=128, tiles_and_channels=((16, 1024), (8, 3200)),
                            side=32, channels=3584, images=12, image_tokens=256, segments=30),
        *attention.CASES["real"],
        Case(LINEAR_CROSS_ENTROPY, dict(tokens=16384, hidden=896, vocab=VOCAB), name="0.5B head"),
        Case(LINEAR_CROSS_ENTROPY, dict(tokens=16384, hidden=3584, vocab=VOCAB), name="7B head"),
    ],
    "tiny": [
        *memory_bound_cases(tokens=128, heads=2, head_dim=32, tiles_and_channels=((2, 16),), side=8, channels=32,
                            images=2, image_tokens=16, segments=4),
        *attention.CASES["tiny"],
        Case(LINEAR_CROSS_ENTROPY, dict(tokens=64, hidden=32, vocab=256), name="head"),
    ],
}


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on the GPU (training precision); float32 on the CPU, where the Triton interpreter's
    bfloat16 is broken and CPU bfloat16 timings would mean nothing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---- running ------------------------------------------------------------------------------------------

def as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def with_grad(spec: OpSpec, args: tuple) -> tuple:
    return tuple(a.detach().requires_grad_() if i in spec.differentiable else a for i, a in enumerate(args))


def forward_backward(run: Callable, spec: OpSpec, args: tuple, context, grads: tuple):
    outputs = as_tuple(run(args, context))
    # Implementations agree on shapes, not always on dtypes (a loss in bfloat16 or float32).
    grads = tuple(g if g.dtype == o.dtype else g.to(o.dtype) for g, o in zip(grads, outputs))
    return torch.autograd.grad(outputs, [args[i] for i in spec.differentiable], grads)


@dataclass
class Job:
    case: Case
    direction: str
    implementation: Implementation


def jobs(cases: list[Case]) -> Iterator[Job]:
    for case in cases:
        directions = (FORWARD, FORWARD_BACKWARD) if case.spec.differentiable else (FORWARD,)
        for direction in directions:
            for implementation in case.spec.implementations(case):
                yield Job(case, direction, implementation)


class KernelSuite:
    """Times jobs; builds each case's rotated input copies once and shares them (and the random output
    gradients of forward+backward) across its jobs."""

    def __init__(self, device: torch.device, dtype: torch.dtype, timer: Timer, seed: int = 0):
        self.device, self.dtype, self.timer = device, dtype, timer
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._inputs: tuple[Case, list[tuple]] | None = None
        self._output_grads: dict[int, tuple] = {}

    def _input_sets(self, case: Case) -> list[tuple]:
        if self._inputs is None or self._inputs[0] is not case:
            self._inputs, self._output_grads = None, {}  # free the previous case's copies before building these
            first = case.spec.make(self.device, self.dtype, self.generator, **case.params)
            set_bytes = nbytes(*(a for a in first if isinstance(a, torch.Tensor)))
            copies = input_copies(3 * set_bytes, self.device)  # inputs, output and gradients per call
            rest = [case.spec.make(self.device, self.dtype, self.generator, **case.params) for _ in range(copies - 1)]
            self._inputs = (case, [first, *rest])
        return self._inputs[1]

    def _grads_for(self, index: int, outputs) -> tuple:
        """Random output gradients of input set ``index``, drawn once from the first outputs seen."""
        if index not in self._output_grads:
            self._output_grads[index] = tuple(
                torch.randn(o.shape, device=o.device, generator=self.generator).to(o.dtype) for o in as_tuple(outputs)
            )
        return self._output_grads[index]

    def run(self, job: Job) -> dict:
        case, implementation = job.case, job.implementation
        spec = case.spec
        row = {"op": spec.name, "case": case.label, "params": {**case.params, **case.options},
               "implementation": implementation.name, "direction": job.direction,
               "dtype": str(self.dtype).removeprefix("torch.")}
        reason = implementation.unavailable(case, self.device, self.dtype)
        if reason is not None:
            return {**row, "status": "skipped", "reason": reason}
        try:
            sets = self._input_sets(case)
            with implementation.selected():
                call = self._callable(implementation, case, sets, job.direction)
                call()  # fails here when the implementation cannot run this case on this device
                median_ms = self.timer.median_ms(call)
                gpu_ms = device_ms(self.device, call)
                memory = peak_memory(self.device, call)
        except RuntimeError as error:  # the implementation cannot run here (dispatch or the library says why)
            return {**row, "status": "skipped", "reason": f"{type(error).__name__}: {error}"}
        except Exception as error:  # a broken op must not stop the others: recorded, and the run fails
            return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}
        timed = {**row, "status": "ok", "median_ms": median_ms, "input_copies": len(sets), **memory}
        if gpu_ms is not None:
            timed["device_ms"] = gpu_ms
        backward = job.direction == FORWARD_BACKWARD
        if spec.bytes_moved is not None:
            forward_bytes, backward_bytes = spec.bytes_moved(sets[0])
            timed["bytes"] = forward_bytes + (backward_bytes if backward else 0)
        if spec.flops is not None:
            forward_flops, backward_flops = spec.flops(sets[0], **case.options)
            timed["flops"] = forward_flops + (backward_flops if backward else 0)
            if backward:
                timed["flops_backward"] = backward_flops
        return timed

    def _callable(self, implementation: Implementation, case: Case, sets: list[tuple], direction: str) -> Callable:
        def run(args, context):
            return implementation.call(context, *args, **case.options)

        if direction == FORWARD:
            prepared = [(args, implementation.prepare(args, case.options)) for args in sets]
            return rotating(lambda pair: run(*pair), prepared)
        prepared = []
        for index, args in enumerate(sets):
            args = with_grad(case.spec, args)
            context = implementation.prepare(args, case.options)
            grads = self._output_grads.get(index) or self._grads_for(index, run(args, context))
            prepared.append((args, context, grads))
        return rotating(lambda item: forward_backward(run, case.spec, *item), prepared)


def run_kernels(device: torch.device, sizes: str, timer: Timer, progress: Callable = iter,
                ops: set[str] | None = None) -> list[dict]:
    """Every job of the ``sizes`` cases (only the ops named in ``ops`` when given)."""
    cases = [case for case in SIZES[sizes] if ops is None or case.spec.name in ops]
    suite = KernelSuite(device, default_dtype(device), timer)
    return [suite.run(job) for job in progress(list(jobs(cases)))]


def add_rates(rows: list[dict], ceilings: dict) -> list[dict]:
    """Add to timed rows: GB/s and the fraction of the copy ceiling (memory-bound ops; from the device time
    too where it was measured), TFLOP/s and the fraction of the matmul ceiling (compute-bound ops; on
    forward+backward rows also the backward alone, from the difference to the same implementation's forward
    row), and the speedup over the engine's 'torch' reference."""
    timed = [row for row in rows if row["status"] == "ok"]
    key = lambda row: (row["op"], row["case"], row["direction"])  # noqa: E731
    torch_ms = {key(row): row["median_ms"] for row in timed if row["implementation"] == "torch"}
    forward_ms = {(row["op"], row["case"], row["implementation"]): row["median_ms"]
                  for row in timed if row["direction"] == FORWARD}
    matmul = ceilings["matmul"]["tflop_per_s"]
    for row in timed:
        if "bytes" in row:
            row["gb_per_s"] = gb_per_s(row["bytes"], row["median_ms"])
            row["fraction_of_copy"] = row["gb_per_s"] / ceilings["copy"]["gb_per_s"]
            if "device_ms" in row:  # the kernels' own bandwidth, without the host's overhead
                row["device_gb_per_s"] = gb_per_s(row["bytes"], row["device_ms"])
                row["device_fraction_of_copy"] = row["device_gb_per_s"] / ceilings["copy"]["gb_per_s"]
        if "flops" in row:
            row["tflop_per_s"] = tflop_per_s(row["flops"], row["median_ms"])
            row["fraction_of_matmul"] = row["tflop_per_s"] / matmul
            forward = forward_ms.get((row["op"], row["case"], row["implementation"]))
            if "flops_backward" in row and forward is not None and row["median_ms"] > forward:
                row["backward_ms"] = row["median_ms"] - forward
                row["backward_tflop_per_s"] = tflop_per_s(row["flops_backward"], row["backward_ms"])
        baseline = torch_ms.get(key(row))
        row["speedup_vs_torch"] = None if baseline is None else baseline / row["median_ms"]
    return rows
