"""What the demo's tiny model learns, and how fast, through which route: held-out accuracy of one question
kind of the demo data (shape, count, colour or motion) trained alone, from the demo preset's fresh model.

1. ``head``: the vision tower and the projector with a linear head on each tile's mean projected row (a
   frame's, concatenated over a clip's frames): how fast the visual features themselves can be learnt.
2. ``model``: the whole model answering that question only, in packs of ``--batch`` samples with V2PE
   deltas drawn as in training, scored as the demo's evaluation scores (``evaluate_choices``): how fast
   they are learnt through the language model, as the demo must learn them.
3. ``head-then-model``: the head route, then the model route from the vision tower and projector it
   trained: whether the language model learns the kind once the visual features carry it.

AdamW (betas 0.9, 0.95, weight decay 0.05) at a constant ``--lr``, gradients clipped at 1, single-threaded.
The record keeps the held-out accuracy at every fifth of the steps, and the seconds taken.

    python -m bench.demo_learning [--kinds shape,motion] [--routes head,model,head-then-model] [--steps 600] [--lr 5e-4]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from internvl3_engine.cli import ArgumentParser

from .harness import command_line, device_info, provenance, utc_now, versions, write_record_and_table

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("color", "shape", "count", "motion")
ROUTES = ("head", "model", "head-then-model")


def _questions(data: Path, kind: str) -> tuple[list, list, list]:
    """The kind's training questions from the demo's single-question records and its held-out questions
    (eval.jsonl's lines), both as the evaluation's records (media, "question", "answer"), and its candidates."""
    from model.train.demo_data import MOTION_QUESTION, QUESTIONS

    question, candidates = MOTION_QUESTION if kind == "motion" else QUESTIONS[kind]
    annotation = "motion.jsonl" if kind == "motion" else "shapes.jsonl"
    train = []
    for line in (data / annotation).read_text().splitlines():
        record = json.loads(line)
        asked, answer = record["conversations"]
        if asked["value"].endswith(question):
            media = {key: record[key] for key in ("image", "video") if key in record}
            train.append({**media, "question": asked["value"], "answer": answer["value"]})
    held = [line for line in (data / "eval.jsonl").read_text().splitlines() if json.loads(line)["kind"] == kind]
    return train, held, list(candidates)


def _head_features(model, media: list[list[torch.Tensor]], width: int) -> torch.Tensor:
    """[items, parts * width]: the mean projected row of each image (all its tiles) or each frame."""
    tiles = torch.cat([tile for parts in media for tile in parts])
    rows = model.encode_images(tiles)
    per_tile = rows.shape[0] // tiles.shape[0]
    counts = [tile.shape[0] * per_tile for parts in media for tile in parts]
    means = [chunk.mean(0) for chunk in rows.split(counts)]
    features, begin = [], 0
    for parts in media:
        features.append(torch.cat(means[begin : begin + len(parts)]))
        begin += len(parts)
    return torch.stack(features)


def _optimizer(parameters, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)


class _Route:
    """One way of training a kind alone: ``loss_of(items)``, ``accuracy()`` on the held-out questions, and
    the parameters it trains."""

    def __init__(self, loss_of, accuracy, parameters):
        self.loss_of, self.accuracy, self.parameters = loss_of, accuracy, parameters


def _head_route(model, model_config, media, held: list, candidates: list, parts: int, seed: int) -> _Route:
    torch.manual_seed(seed)  # the head's initialisation: the same curve on every run of a seed
    head = nn.Linear(model_config.text.hidden_size * parts, len(candidates))
    index = {answer: row for row, answer in enumerate(candidates)}
    held_items = [json.loads(line) for line in held]

    def loss_of(items):
        logits = head(_head_features(model, [media(item)[1] for item in items], model_config.text.hidden_size))
        return logits, nn.functional.cross_entropy(logits, torch.tensor([index[item["answer"]] for item in items]))

    def accuracy():
        with torch.no_grad():
            hits = sum((loss_of(held_items[i : i + 32])[0].argmax(-1) == torch.tensor([index[item["answer"]] for item in held_items[i : i + 32]])).sum().item()
                       for i in range(0, len(held_items), 32))
        return hits / len(held_items)

    return _Route(loss_of, accuracy, [*model.vision.parameters(), *model.projector.parameters(), *head.parameters()])


def _model_route(model, model_config, media, kind: str, held: list, data: Path, tiler, video_frames: int, rng: random.Random) -> _Route:
    from model.data import ConversationEncoder, PackingConfig, collate
    from model.data.tokenizer import ByteTokenizer
    from model.train.evaluation import evaluate_choices

    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=model_config.tokens_per_tile, system_message=None)
    packing = PackingConfig(max_packed_tokens=2**31 - 1, max_tiles=2**31 - 1)
    eval_file = data / f"eval-{kind}.jsonl"
    eval_file.write_text("\n".join(held) + "\n")

    def loss_of(items):
        samples = []
        for item in items:
            text, pixels = media(item)
            conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": item["answer"]}]
            samples.append(encoder.encode_conversation(conversation, pixels, item.get("video") or item["image"]))
        pack = collate(samples, packing, rng)
        output = model(pack.input_ids, pack.pixel_values, pack.cu_seqlens, pack.positions, pack.labels, pack.loss_weights,
                       pack.max_seqlen, image_flags=pack.image_flags)
        return None, output.loss

    def accuracy():
        result = evaluate_choices(model, str(eval_file), encoder, tiler, torch.device("cpu"), video_frames=video_frames)
        return result["per_kind"][kind]["accuracy"]

    return _Route(loss_of, accuracy, list(model.parameters()))


def train_route(route: str, kind: str, data: Path, steps: int, batch: int, lr: float, seed: int, checkpoints: int = 5) -> dict:
    """Held-out accuracy of ``kind`` at every ``steps / checkpoints`` steps of training it alone by ``route``
    (``head-then-model``: ``steps`` of the head route, then ``steps`` of the model route from its vision
    tower and projector, the curve of the second part)."""
    from model.modeling import InternVL3
    from model.train.evaluation import question_media
    from model.train.presets import preset_config

    config = preset_config("demo")
    model_config = config.model_config()
    model = InternVL3(model_config, init_seed=seed)
    tiler = config.data.tiler(model_config.vision.image_size)
    cache: dict = {}

    def media(record: dict) -> tuple[str, list]:  # the question's text and tiles, as the evaluation builds them
        return question_media(record, str(data), tiler, config.data.video_frames, cache)

    train, held, candidates = _questions(data, kind)
    rng = random.Random(seed)
    builders = {
        "head": lambda: _head_route(model, model_config, media, held, candidates, config.data.video_frames if kind == "motion" else 1, seed),
        "model": lambda: _model_route(model, model_config, media, kind, held, data, tiler, config.data.video_frames, rng),
    }
    stages = [builders[name]() for name in route.split("-then-")]  # only the routes this one runs
    curve, began = [], time.perf_counter()
    for stage, part in enumerate(stages):
        optimizer = _optimizer(part.parameters, lr)
        last = stage == len(stages) - 1
        for step in range(1, steps + 1):
            _, loss = part.loss_of(rng.sample(train, batch))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(part.parameters, 1.0)
            optimizer.step()
            if last and (step % max(steps // checkpoints, 1) == 0 or step == steps):
                curve.append({"step": step, "loss": round(loss.item(), 4), "accuracy": round(part.accuracy(), 4)})
                print(f"bench.demo_learning: {route} {kind} step {step}: held-out {curve[-1]['accuracy']:.1%}", file=sys.stderr)
    return {"route": route, "kind": kind, "lr": lr, "batch": batch, "steps": steps, "chance": round(1 / len(candidates), 4),
            "views": steps * batch * len(stages), "seconds": round(time.perf_counter() - began, 1), "curve": curve}


def markdown(record: dict) -> str:
    lines = [f"Demo learning routes ({provenance(record)}), seed {record['seed']}: held-out accuracy of one question kind",
             "trained alone (views: questions seen).", "",
             "| route | kind | lr | batch | chance | " + " | ".join(f"step {entry['step']}" for entry in record["runs"][0]["curve"]) + " | views | s |",
             "|---|---|---|---|---|" + "---|" * len(record["runs"][0]["curve"]) + "---|---|"]
    for run in record["runs"]:
        accuracies = " | ".join(f"{entry['accuracy']:.1%}" for entry in run["curve"])
        lines.append(f"| {run['route']} | {run['kind']} | {run['lr']:g} | {run['batch']} | {run['chance']:.1%} | {accuracies} | {run['views']} | {run['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.demo_learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="shape,motion", type=lambda text: text.split(","), help=f"question kinds among {KINDS}")
    parser.add_argument("--routes", default="head,model", type=lambda text: text.split(","), help=f"among {ROUTES}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16, help="questions a step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0, help="of the demo data and the model's initialisation")
    parser.add_argument("--data", type=Path, help="a generated demo data folder (default: generated for --seed in a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not set(args.kinds) <= set(KINDS) or not set(args.routes) <= set(ROUTES):
        parser.error(f"--kinds among {KINDS}, --routes among {ROUTES}")
    if args.steps < 1 or args.batch < 1 or not args.lr > 0:
        parser.error("--steps and --batch must be >= 1 and --lr > 0")
    torch.set_num_threads(1)
    from model.train.demo_data import generate

    with tempfile.TemporaryDirectory() as temporary:
        data = args.data or Path(temporary) / "data"
        if args.data is None:
            generate(str(data), seed=args.seed)
        runs = [train_route(route, kind, data, args.steps, args.batch, args.lr, args.seed) for kind in args.kinds for route in args.routes]
    date = utc_now()
    record = {"suite": "demo_learning", "date": date.strftime("%Y-%m-%d"), "device": device_info(torch.device("cpu")),
              "versions": versions(), "command": command_line(), "seed": args.seed, "runs": runs}
    write_record_and_table(record, markdown(record), args.out / f"{date.strftime('%Y%m%dT%H%M%SZ')}_cpu_demo-learning", "bench.demo_learning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
