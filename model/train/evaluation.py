"""Multiple-choice evaluation of a trained model (the demo's held-out questions)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch

from ..data import ConversationEncoder, ImageTiler, PackingConfig, collate, load_image


def evaluate_choices(model, eval_file: str, encoder: ConversationEncoder, tiler: ImageTiler, device, autocast=contextlib.nullcontext,
                     delta: float = 0.25, limit: Optional[int] = None, pack_size: int = 96) -> dict:
    """Accuracy on multiple-choice questions ({"image", "question", "answer", "candidates", "kind"} a line):
    every candidate answer is scored by its summed log-probability (answer tokens and <|im_end|>) after the
    question, and the best one is the model's answer. Returns accuracy and chance (1 / candidates), overall
    and per kind."""
    from .mpo import segment_sums

    with open(eval_file, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if limit:
        records = records[:limit]
    root = os.path.dirname(os.path.abspath(eval_file))
    config = PackingConfig(max_packed_tokens=2**31 - 1, max_tiles=2**31 - 1, delta=delta)
    tiles_cache: dict[str, torch.Tensor] = {}
    samples, owners = [], []
    for index, record in enumerate(records):
        image = record.get("image")
        pixel_values = []
        if image:
            if image not in tiles_cache:
                tiles_cache[image] = tiler(load_image(os.path.join(root, image)))
            pixel_values = [tiles_cache[image]]
        for candidate in record["candidates"]:
            conversation = [{"from": "human", "value": record["question"]}, {"from": "gpt", "value": candidate}]
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
