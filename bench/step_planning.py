"""The data planner's host time per step against the number of data-parallel ranks, and what of it reaches
the training step's critical path.

Every rank plans every rank's packs of a step (StepPlanner: the mixing stream, the packer, the vision-aware
balancer over dp_world packs), so its work grows with the world size. For each simulated world size W (one
rank's planner, dp_world W, one pack a rank), on a generated index of text records of 500-3,000 tokens and
image records of 1-6 tiles of 256 tokens packed into 16K-token packs, and the balancer's cost the trainer's
(InternVL3-8B's training FLOPs of each pack):

- ``plan_s``: the mean time of ``plan_step`` (planning on demand: all of it between two steps);
- ``wait_s``: with the trainer's planning ahead (StepPlanner(ahead=2), a thread of its own), the mean time
  the consumer waits for a share while each step takes ``--step-s`` seconds (simulated by sleeping: a GPU
  step's host thread spends it waiting on the device), and ``added``: wait_s / step_s.

    python -m bench.step_planning [--worlds 8,64,256,1024] [--steps 6] [--step-s 1.0] [--out bench/results]
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from internvl3_engine.cli import ArgumentParser

from .harness import command_line, device_info, provenance, utc_now, versions, write_record_and_table

ROOT = Path(__file__).resolve().parents[1]
TILE, TOKENS_PER_TILE, MAX_TILES_PER_IMAGE, PACK_TOKENS = 448, 256, 6, 16384


def write_data(folder: Path, text_records: int, image_records: int) -> list:
    """A text and an image dataset (the images' sizes give 1 to 6 tiles; only their headers are read)."""
    from model.data import DatasetSpec

    rng = random.Random(0)
    images = folder / "images"
    images.mkdir(parents=True)
    sizes = [(448, 448), (896, 448), (896, 896), (1344, 448), (1344, 896), (1344, 1344)]
    for index, size in enumerate(sizes):
        Image.new("RGB", size, (index * 40, 80, 160)).save(images / f"{index}.png")
    with open(folder / "text.jsonl", "w") as handle:
        for _ in range(text_records):
            handle.write(json.dumps({"text": "w" * rng.randint(500, 3000)}) + "\n")
    with open(folder / "mm.jsonl", "w") as handle:
        for _ in range(image_records):
            handle.write(json.dumps({"image": f"{rng.randrange(len(sizes))}.png", "conversations": [
                {"from": "human", "value": "<image>\n" + "q" * rng.randint(20, 200)},
                {"from": "gpt", "value": "a" * rng.randint(50, 800)}]}) + "\n")
    return [DatasetSpec("text", str(folder / "text.jsonl")), DatasetSpec("mm", str(folder / "mm.jsonl"), root=str(images))]


def build_planner(specs, indexes, encoder, tiler, world: int, ahead: int, cost):
    from model.data import DataErrors, MixedStream, Packer, PackingConfig, RecordDataset, StepPlanner

    datasets = [RecordDataset(spec, encoder, tiler, seed=0, index=indexes[spec.name]) for spec in specs]
    stream = MixedStream(datasets, 1, 3, DataErrors(journal=[]), shapes=True)
    packing = PackingConfig(max_packed_tokens=PACK_TOKENS, max_tiles=64, max_buffers=4)
    return StepPlanner(stream, Packer(packing, seed=0), 1, 0, world, cost=cost, ahead=ahead)


def measure(specs, indexes, encoder, tiler, world: int, steps: int, step_s: float, cost) -> dict:
    planner = build_planner(specs, indexes, encoder, tiler, world, 0, cost)
    planner.plan_step()  # the packer's buffers filled
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        share = planner.plan_step()
        times.append(time.perf_counter() - began)
    items = sum(len(plan.keys) for plan in share.plans) * world
    ahead = build_planner(specs, indexes, encoder, tiler, world, 2, cost)
    shares, waits = iter(ahead), []
    next(shares)  # the first share is planned while nothing else runs
    for _ in range(steps):
        time.sleep(step_s)  # the step
        began = time.perf_counter()
        next(shares)
        waits.append(time.perf_counter() - began)
    ahead.close()
    wait = statistics.mean(waits)
    return {"world": world, "plan_s": statistics.mean(times), "plan_max_s": max(times), "samples_per_step": items,
            "wait_s": wait, "wait_max_s": max(waits), "added": wait / step_s}


def markdown(record: dict) -> str:
    lines = [
        f"# Data planning per step ({record['pack_tokens']}-token packs, one a rank; step of {record['step_s']} s)",
        "",
        provenance(record),
        "",
        "| data-parallel ranks | samples a step | plan_step (ms, mean / max) | wait with planning ahead (ms, mean / max) | added to the step |",
        "|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        lines.append(f"| {row['world']} | {row['samples_per_step']} | {row['plan_s'] * 1e3:.0f} / {row['plan_max_s'] * 1e3:.0f} | "
                     f"{row['wait_s'] * 1e3:.1f} / {row['wait_max_s'] * 1e3:.1f} | {row['added']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.step_planning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="8,64,256,1024", type=lambda text: [int(w) for w in text.split(",")])
    parser.add_argument("--steps", type=int, default=6, help="steps measured per world size")
    parser.add_argument("--step-s", type=float, default=1.0, help="the simulated training step (seconds)")
    parser.add_argument("--records", type=int, default=3000, help="records in the generated index (a third of them images)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if any(world < 1 for world in args.worlds) or args.steps < 1 or args.step_s <= 0 or args.records < 3:
        parser.error("--worlds, --steps, --records: positive integers; --step-s: positive")
    from internvl3_engine.planner import model_shape, training_flops
    from model.data import ConversationEncoder, ImageTiler, load_or_build_index
    from model.data.tokenizer import ByteTokenizer

    shape = model_shape("internvl3-8b")

    def cost(plan) -> float:  # the trainer's: the pack's training FLOPs
        return training_flops(shape, plan.num_tokens, plan.num_tiles, plan.sample_lengths())["total"]

    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE, system_message=None)
    tiler = ImageTiler(tile_size=TILE, max_num=MAX_TILES_PER_IMAGE)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        specs = write_data(Path(temporary), args.records * 2 // 3, args.records // 3)
        indexes = {spec.name: load_or_build_index(spec, encoder, tiler) for spec in specs}
        for world in args.worlds:
            rows.append(measure(specs, indexes, encoder, tiler, world, args.steps, args.step_s, cost))
            print(f"bench.step_planning: W = {world}: plan_step {rows[-1]['plan_s'] * 1e3:.0f} ms, wait {rows[-1]['wait_s'] * 1e3:.1f} ms",
                  file=sys.stderr)
    date = utc_now()
    record = {"suite": "step-planning", "date": date.strftime("%Y-%m-%d"), "device": device_info(torch.device("cpu")),
              "versions": versions(), "command": command_line(), "pack_tokens": PACK_TOKENS, "step_s": args.step_s,
              "records": args.records, "rows": rows}
    write_record_and_table(record, markdown(record), args.out / f"{date.strftime('%Y%m%dT%H%M%SZ')}_cpu_step-planning",
                           "bench.step_planning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
