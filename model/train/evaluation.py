"""Multiple-choice evaluation of a trained model (the demo's held-out questions)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch

from ..data import ConversationEncoder, ImageTiler, PackingConfig, collate, load_image
from ..data.video import frame_tiles, read_video, with_video_prompt


def question_media(record: dict, root: str, tiler: ImageTiler, video_frames: int, cache: dict) -> tuple[str, list]:
    """The question's text and its media's tiles (one tensor per image or frame), as the training data builds
    them: an image path or a list of them (sharing the tile budget), or a video (sampled frames, one tile
    each, the ``<video>`` placeholder replaced by the frames' prompt). ``cache``: tiles by path."""
    question, video, images = record["question"], record.get("video"), record.get("image")
    if video:
        if video not in cache:
            cache[video] = frame_tiles(read_video(os.path.join(root, video), video_frames), tiler.tile_size)
        return with_video_prompt(question, len(cache[video])), cache[video]
    paths = [images] if isinstance(images, str) else list(images or [])
    shared = tiler.for_images(len(paths))
    for path in paths:
        if (path, len(paths)) not in cache:
            cache[path, len(paths)] = shared(load_image(os.path.join(root, path)))
    return question, [cache[path, len(paths)] for path in paths]


def evaluate_choices(model, eval_file: str, encoder: ConversationEncoder, tiler: ImageTiler, device, autocast=contextlib.nullcontext,
                     delta: float = 0.25, limit: Optional[int] = None, pack_size: int = 96, video_frames: int = 8) -> dict:
    """Accuracy on multiple-choice questions ({"question", "answer", "candidates", "kind"} and its media:
    "image" (a path or a list of paths) or "video", a line): every candidate answer is scored by its summed
    log-probability (answer tokens and <|im_end|>) after the question, and the best one is the model's
    answer. ``video_frames``: frames sampled per video. Returns accuracy and chance (1 / candidates),
    overall and per kind."""
    from .mpo import segment_sums

    with open(eval_file, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if limit:
        records = records[:limit]
    root = os.path.dirname(os.path.abspath(eval_file))
    config = PackingConfig(max_packed_tokens=2**31 - 1, max_tiles=2**31 - 1, delta=delta)
    cache: dict = {}
    samples, owners = [], []
    for index, record in enumerate(records):
        question, pixel_values = question_media(record, root, tiler, video_frames, cache)
        for candidate in record["candidates"]:
            conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": candidate}]
            samples.append(encoder.encode_conversation(conversation, pixel_values, f"{eval_file}:{index + 1}"))
            owners.append((index, candidate))
    was_training = model.training
    model.eval()
    scores: list[float] = []
    with torch.no_grad():
        for begin in range(0, len(samples), pack_size):
            batch = collate(samples[begin : begin + pack_size], config).to(device)
            with autocast():
                # Per-token CE from the engine's linear cross-entropy: the labels' negated log-probabilities.
                output = model(batch.input_ids, batch.pixel_values, batch.cu_seqlens, batch.positions, batch.labels,
                               None, batch.max_seqlen, image_flags=batch.image_flags, loss_reduction="none")
            scores += segment_sums(-output.loss, batch.cu_seqlens).tolist()
    model.train(was_training)
    best: dict[int, tuple[str, float]] = {}
    for (index, candidate), score in zip(owners, scores):
        if index not in best or score > best[index][1]:
            best[index] = (candidate, score)
    per_kind: dict[str, list] = {}
    for index, record in enumerate(records):
        per_kind.setdefault(record.get("kind", "all"), []).append((best[index][0] == record["answer"], 1.0 / len(record["candidates"])))
    everything = [entry for entries in per_kind.values() for entry in entries]

    def summarise(entries):
        return {"accuracy": sum(hit for hit, _ in entries) / len(entries), "chance": sum(c for _, c in entries) / len(entries), "questions": len(entries)}

    return {**summarise(everything), "per_kind": {kind: summarise(entries) for kind, entries in per_kind.items()}}


def format_accuracy(accuracy: dict) -> str:
    lines = [f"held-out accuracy: {accuracy['accuracy']:.1%} on {accuracy['questions']} questions (chance {accuracy['chance']:.1%})"]
    for kind, values in accuracy["per_kind"].items():
        lines.append(f"  {kind:<8} {values['accuracy']:.1%}  (chance {values['chance']:.1%}, {values['questions']} questions)")
    return "\n".join(lines)
