"""The training-step suite: forward + backward + AdamW step of the reference model (model.InternVL3) on one
packed batch, at the "tiny" preset (a CPU smoke test) and InternVL3-1B/2B (GPU, bfloat16 parameters).

Reported per preset: step time (median), tokens/s, peak memory, and MFU = model FLOPs per step / (step time
* peak FLOP/s), against both the matmul ceiling measured in the same run and the datasheet's bf16 peak.

Baseline, in the same run: transformers' InternVLForConditionalGeneration (sdpa attention; same config, dtype,
parameter count, optimizer) on the same samples padded into [samples, longest] with an attention mask, the
usual way to batch it. Its tokens/s counts the real tokens only and its MFU the same model FLOPs: the padding
is work that does not count; our row reports the ratio of the two step times.

Model FLOPs per step: internvl3_engine.planner.training_flops (its module states the formula; the trainer's MFU
and the planner use the same one).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .attention import import_error
from .harness import Timer, peak_memory, randn

IGNORE_INDEX = -100
ADAMW_LR = 1e-5
ENGINE_IMPLEMENTATION = "model.InternVL3"  # the reference model on the engine's kernels, packed batch
TRANSFORMERS_IMPLEMENTATION = "transformers-sdpa"  # transformers' InternVL, sdpa attention, padded batch


@dataclass(frozen=True)
class TrainCase:
    """One packed batch for ``preset``: ``tokens`` tokens in ``samples`` samples, the first ``images`` of
    them starting with an image of ``tiles_per_image`` tiles (InternVL's dynamic tiles + the thumbnail),
    each tile ``tokens_per_tile`` <IMG_CONTEXT> tokens. ``device`` is where it is meant to run."""

    preset: str
    tokens: int
    samples: int
    images: int
    tiles_per_image: int
    device: str

    @property
    def label(self) -> str:
        return (f"{self.preset}: {self.tokens} tokens, {self.samples} samples, "
                f"{self.images} images x {self.tiles_per_image} tiles")


# 1B/2B: 8192 tokens hold 2 images of 12+1 tiles (2 x 13 x 256 = 6656 visual tokens) plus 1536 text tokens;
# four such images (13,312 visual tokens) would not fit in the pack.
SIZES: dict[str, list[TrainCase]] = {
    "tiny": [TrainCase("tiny", tokens=128, samples=4, images=2, tiles_per_image=3, device="cpu")],
    "real": [
        TrainCase("internvl3-1b", tokens=8192, samples=8, images=2, tiles_per_image=13, device="cuda"),
        TrainCase("internvl3-2b", tokens=8192, samples=8, images=2, tiles_per_image=13, device="cuda"),
    ],
}


def train_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 parameters (and AdamW states) on the GPU; float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---- the batch ------------------------------------------------------------------------------------------

def make_batch(config, case: TrainCase, device: torch.device, dtype: torch.dtype, generator) -> dict:
    """Random token ids (never the image token outside the images), each image's <IMG_CONTEXT> run after its
    sample's first token, labels random with IGNORE_INDEX at the image tokens and each sample's last token,
    random pixel values; the model computes the V2PE positions (delta 1)."""
    image_tokens = case.tiles_per_image * config.tokens_per_tile
    text_tokens = case.tokens - case.images * image_tokens
    if text_tokens < case.samples:
        raise ValueError(f"{case.label}: the images leave {text_tokens} text tokens for {case.samples} samples")
    cuts = torch.randperm(text_tokens - 1, generator=torch.Generator().manual_seed(0))[: case.samples - 1] + 1
    text = torch.diff(torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([text_tokens])]))
    lengths = text + torch.tensor([image_tokens if i < case.images else 0 for i in range(case.samples)])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)

    vocab, image_id = config.text.vocab_size, config.image_token_id
    input_ids = torch.randint(0, vocab - 1, (case.tokens,), device=device, generator=generator)
    input_ids += (input_ids >= image_id).long()  # skip the image token
    is_visual = torch.zeros(case.tokens, dtype=torch.bool)
    for start in cu_seqlens[: case.images].tolist():
        is_visual[start + 1:start + 1 + image_tokens] = True
    is_visual = is_visual.to(device)
    input_ids = input_ids.masked_fill(is_visual, image_id)

    labels = torch.randint(0, vocab, (case.tokens,), device=device, generator=generator)
    last = torch.zeros(case.tokens, dtype=torch.bool)
    last[cu_seqlens[1:].long() - 1] = True
    labels = labels.masked_fill(is_visual | last.to(device), IGNORE_INDEX)

    size = config.vision.image_size
    tiles = case.images * case.tiles_per_image
    return {
        "input_ids": input_ids,
        "pixel_values": randn((tiles, config.vision.num_channels, size, size), dtype, device, generator),
        "cu_seqlens": cu_seqlens.to(device),
        "labels": labels,
        "max_seqlen": int(lengths.max()),
        "lengths": lengths.tolist(),
    }


# ---- FLOPs ----------------------------------------------------------------------------------------------

def model_flops(model, case: TrainCase, lengths: list[int]) -> dict:
    """Model FLOPs of one training step (forward + backward), by part: the formula above, as
    internvl3_engine.planner.training_flops computes it, and the parameter counts it used."""
    from internvl3_engine.planner import ModelShape, training_flops

    shape = ModelShape.from_modules(model.config.to_hf(), model)
    flops = training_flops(shape, case.tokens, case.images * case.tiles_per_image, lengths)
    return {**flops, "params": {"llm_without_embedding": shape.language.matmul_parameters,
                                "vit": shape.vision.matmul_parameters, "projector": shape.projector.matmul_parameters}}


# ---- the transformers baseline: the same samples, padded --------------------------------------------------

PAD_TOKEN_ID = 0  # masked out by the attention mask and ignored by the loss: any id but the image token's


def padded_batch(batch: dict) -> dict:
    """The samples of the packed ``batch`` as transformers' InternVL takes them: input_ids, attention_mask
    and labels [samples, longest], right-padded (mask 0 and IGNORE_INDEX on padding), and the same
    pixel_values (the tiles in the order of their <IMG_CONTEXT> runs, which keep their places).

    Our labels are aligned (labels[t] is the target of position t) while transformers shifts its labels one
    place itself, so each sample's labels move one place right: the same tokens are supervised with the same
    targets (make_batch ignores each sample's last label, the one the shift drops)."""
    lengths = batch["lengths"]
    shape = (len(lengths), max(lengths))
    device = batch["input_ids"].device
    input_ids = torch.full(shape, PAD_TOKEN_ID, dtype=torch.long, device=device)
    attention_mask = torch.zeros(shape, dtype=torch.long, device=device)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)
    for row, (start, length) in enumerate(zip(batch["cu_seqlens"][:-1].tolist(), lengths)):
        input_ids[row, :length] = batch["input_ids"][start:start + length]
        attention_mask[row, :length] = 1
        labels[row, 1:length] = batch["labels"][start:start + length - 1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": batch["pixel_values"]}


def transformers_model(config, device: torch.device, dtype: torch.dtype, weights_of=None):
    """transformers' InternVLForConditionalGeneration of ``config`` (same parameters as model.InternVL3) with
    sdpa attention in its ViT and its LLM, in ``dtype`` on ``device``, in training mode. Random weights, or
    those of ``weights_of`` (a model.InternVL3, copied through an 'hf' checkpoint): how the tests check that
    it computes our model's loss."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if weights_of is None:
        with torch.device(device):
            model = InternVLForConditionalGeneration(InternVLConfig(**config.to_hf(), attn_implementation="sdpa"))
    else:
        with tempfile.TemporaryDirectory() as folder:
            weights_of.save_pretrained(folder)
            model = InternVLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").to(device)
    return model.to(dtype).train()


# ---- running --------------------------------------------------------------------------------------------

def engine_loss(model, batch: dict) -> Callable[[], torch.Tensor]:
    """The loss of model.InternVL3 on the packed ``batch``."""
    return lambda: model(batch["input_ids"], batch["pixel_values"], batch["cu_seqlens"], None, batch["labels"],
                         None, batch["max_seqlen"]).loss


def transformers_loss(model, inputs: dict) -> Callable[[], torch.Tensor]:
    """The loss of transformers' InternVL on the padded ``inputs``; a training step builds no KV cache."""
    return lambda: model(**inputs, use_cache=False).loss


def training_step(model, loss: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One training step of ``model``: forward (``loss()``), backward, AdamW step (fused on CUDA); returns the
    loss. The first call allocates the optimizer's states."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, fused=next(model.parameters()).is_cuda)

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return value.detach()

    return step


def _engine_setup(config, batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[Callable, dict]:
    from model import InternVL3

    with torch.device(device):
        model = InternVL3(config).to(dtype)
    return training_step(model, engine_loss(model, batch)), {"padding_fraction": 0.0}


def _transformers_setup(config, batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[Callable, dict]:
    model = transformers_model(config, device, dtype)
    inputs = padded_batch(batch)
    samples, longest = inputs["input_ids"].shape
    padded = samples * longest
    facts = {"padded_shape": [samples, longest], "padded_tokens": padded,
             "padding_fraction": 1 - sum(batch["lengths"]) / padded}
    return training_step(model, transformers_loss(model, inputs)), facts


def _timed_step(row: dict, device: torch.device, timer: Timer, setup: Callable[[], tuple[Callable, dict]]) -> dict:
    """``row`` with the median time and peak memory of the training step ``setup()`` builds (with facts
    about its batch); skipped when it runs out of memory, error on any other exception."""
    step = None
    try:
        step, facts = setup()
        step()  # the first step allocates the optimizer's states
        median_ms = timer.median_ms(step)
        memory = peak_memory(device, step)
    except torch.cuda.OutOfMemoryError as error:
        return {**row, "status": "skipped", "reason": f"out of memory: {error}".splitlines()[0]}
    except Exception as error:  # recorded, and the run fails
        return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}
    finally:
        del step  # the model and its optimizer: free them before the next implementation builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**row, "status": "ok", "median_step_ms": median_ms, **facts, **memory}


def _with_rates(row: dict, case: TrainCase, flops: dict, ceilings: dict) -> dict:
    """A timed ``row`` with tokens/s (real tokens: padding does not count) and MFU (the model FLOPs of the
    real tokens: what padding costs a padded batch lowers its MFU)."""
    if row["status"] != "ok":
        return row
    seconds = row["median_step_ms"] * 1e-3
    achieved = flops["total"] / seconds
    datasheet = ceilings.get("datasheet")
    return {
        **row, "tokens_per_s": case.tokens / seconds, "model_flops": flops, "model_tflop_per_s": achieved / 1e12,
        "mfu_vs_matmul": achieved / (ceilings["matmul"]["tflop_per_s"] * 1e12),
        "mfu_vs_datasheet": None if datasheet is None else achieved / (datasheet["tflop_per_s"] * 1e12),
    }


def run_case(case: TrainCase, device: torch.device, timer: Timer, ceilings: dict, seed: int = 0) -> list[dict]:
    """Time the training step of ``case`` on ``device``: model.InternVL3 on the packed batch, then
    transformers' InternVL on the same samples padded; two rows of the record (skipped where ``case`` is
    not meant to run, where transformers is not importable or out of memory; error on any other exception).
    Our row gets ``speedup_vs_transformers``: the baseline's step time / ours."""
    from model import InternVL3, InternVL3Config

    dtype = train_dtype(device)
    row = {"preset": case.preset, "case": case.label, "params": asdict(case), "dtype": str(dtype).removeprefix("torch.")}
    ours = {**row, "implementation": ENGINE_IMPLEMENTATION}
    baseline = {**row, "implementation": TRANSFORMERS_IMPLEMENTATION}
    if case.device == "cuda" and device.type != "cuda":
        reason = f"{case.preset} is timed on a GPU"
        return [{**ours, "status": "skipped", "reason": reason}, {**baseline, "status": "skipped", "reason": reason}]
    config = InternVL3Config.preset(case.preset)
    batch = make_batch(config, case, device, dtype, torch.Generator(device=device).manual_seed(seed))
    with torch.device("meta"):  # the parameter counts, without memory
        flops = model_flops(InternVL3(config), case, batch["lengths"])
    described = {"tiles": case.images * case.tiles_per_image, "segment_lengths": batch["lengths"]}
    ours = _with_rates(_timed_step({**ours, **described}, device, timer,
                                   lambda: _engine_setup(config, batch, device, dtype)), case, flops, ceilings)
    missing = import_error("transformers", "InternVLForConditionalGeneration")
    if missing is not None:
        baseline = {**baseline, "status": "skipped", "reason": missing}
    else:
        baseline = _with_rates(_timed_step({**baseline, **described}, device, timer,
                                           lambda: _transformers_setup(config, batch, device, dtype)),
                               case, flops, ceilings)
    timed = ours["status"] == baseline["status"] == "ok"
    ours["speedup_vs_transformers"] = baseline["median_step_ms"] / ours["median_step_ms"] if timed else None
    return [ours, baseline]


def run_train(device: torch.device, sizes: str, timer: Timer, ceilings: dict, progress: Callable = iter) -> list[dict]:
    return [row for case in progress(SIZES[sizes]) for row in run_case(case, device, timer, ceilings)]
