"""The training-step suite: forward + backward + AdamW step of the reference model (model.InternVL3) on one
packed batch, at the "tiny" preset (a CPU smoke test) and InternVL3-1B/2B (GPU, bfloat16 parameters).

Reported per preset: step time (median), tokens/s, peak memory, and MFU = model FLOPs per step / (step time
* peak FLOP/s), against both the matmul ceiling measured in the same run and the datasheet's bf16 peak.

Model FLOPs per step (performance-anchors.md; the AdamW update and the norms are not counted):
  6 * N_llm * T                        the LLM's matmuls, N_llm = its parameters without the input embedding
                                       table (the untied head is a matmul and counts; a tied head is added)
  + 12 * layers * hidden * sum(L_i^2) / 2   the LLM's attention (QK^T and PV, x3 for training, causal halves)
  + tiles * (6 * N_vit * S + 12 * vit_layers * vit_hidden * S^2)
                                       the ViT per tile of S = 1 + patches tokens (not causal), N_vit without
                                       the position embedding and CLS token
  + tiles * 6 * N_projector * tokens_per_tile
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .harness import Timer, peak_memory, randn

IGNORE_INDEX = -100
ADAMW_LR = 1e-5


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
    """Model FLOPs of one training step (forward + backward), by part (the module docstring's formula)."""
    config = model.config
    text, vision = config.text, config.vision
    embedding = model.language.embed_tokens.weight.numel()
    llm_params = sum(p.numel() for p in model.language.parameters()) - embedding
    if text.tie_word_embeddings:
        llm_params += embedding  # the head's matmul still runs
    vit_params = (sum(p.numel() for p in model.vision.parameters())
                  - model.vision.embeddings.position_embedding.numel() - model.vision.embeddings.cls_token.numel())
    projector_params = sum(p.numel() for p in model.projector.parameters())
    tiles = case.images * case.tiles_per_image
    tile_tokens = 1 + vision.grid_size**2
    parts = {
        "llm_matmuls": 6 * llm_params * case.tokens,
        "llm_attention": 12 * text.num_layers * text.num_heads * text.head_dim * sum(n * n for n in lengths) / 2,
        "vit_matmuls": tiles * 6 * vit_params * tile_tokens,
        "vit_attention": tiles * 12 * vision.num_layers * vision.hidden_size * tile_tokens**2,
        "projector": tiles * 6 * projector_params * config.tokens_per_tile,
    }
    return {**parts, "total": sum(parts.values()),
            "params": {"llm_without_embedding": llm_params, "vit": vit_params, "projector": projector_params}}


# ---- running --------------------------------------------------------------------------------------------

def _training_step(model, optimizer, batch: dict) -> Callable[[], None]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch["input_ids"], batch["pixel_values"], batch["cu_seqlens"], None, batch["labels"],
                     None, batch["max_seqlen"]).loss
        loss.backward()
        optimizer.step()

    return step


def run_case(case: TrainCase, device: torch.device, timer: Timer, ceilings: dict, seed: int = 0) -> dict:
    """Time the training step of ``case`` on ``device``; a row of the record (skipped where it is not meant
    to run or runs out of memory, error on any other exception)."""
    from model import InternVL3, InternVL3Config

    dtype = train_dtype(device)
    row = {"preset": case.preset, "case": case.label, "params": asdict(case), "dtype": str(dtype).removeprefix("torch.")}
    if case.device == "cuda" and device.type != "cuda":
        return {**row, "status": "skipped", "reason": f"{case.preset} is timed on a GPU"}
    generator = torch.Generator(device=device).manual_seed(seed)
    model = optimizer = None
    try:
        config = InternVL3Config.preset(case.preset)
        with torch.device(device):
            model = InternVL3(config).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, fused=device.type == "cuda")
        batch = make_batch(config, case, device, dtype, generator)
        step = _training_step(model, optimizer, batch)
        step()  # the first step allocates the optimizer's states
        median_ms = timer.median_ms(step)
        memory = peak_memory(device, step)
        flops = model_flops(model, case, batch["lengths"])
    except torch.cuda.OutOfMemoryError as error:
        return {**row, "status": "skipped", "reason": f"out of memory: {error}".splitlines()[0]}
    except Exception as error:  # recorded, and the run fails
        return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"}
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    achieved = flops["total"] / (median_ms * 1e-3)
    datasheet = ceilings.get("datasheet")
    return {
        **row, "status": "ok", "median_step_ms": median_ms, "tokens_per_s": case.tokens / (median_ms * 1e-3),
        "tiles": case.images * case.tiles_per_image, "segment_lengths": batch["lengths"],
        "model_flops": flops, "model_tflop_per_s": achieved / 1e12,
        "mfu_vs_matmul": achieved / (ceilings["matmul"]["tflop_per_s"] * 1e12),
        "mfu_vs_datasheet": None if datasheet is None else achieved / (datasheet["tflop_per_s"] * 1e12),
        **memory,
    }


def run_train(device: torch.device, sizes: str, timer: Timer, ceilings: dict, progress: Callable = iter) -> list[dict]:
    return [run_case(case, device, timer, ceilings) for case in progress(SIZES[sizes])]

