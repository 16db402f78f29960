"""Start and export time and memory per rank of the trainer's sharded start, at several world sizes.

For each world size W, ``torchrun --standalone --nproc-per-node W -m model.train --init CKPT --plan {}
--max-steps 0 --export DIR`` (the dry run: build on the meta device, parallelize, materialise and read each
rank's shards; then write the weights from the shards) and read the per-rank report the dry run writes
before the export (start.json): parameter bytes held, peak RSS, anonymous memory after the load, peak GPU
memory on CUDA, seconds from the trainer's construction to the end of the load; beside each rank's peak RSS
over the whole run, export included (bench.rank_peak), the export's seconds (from start.json to the
export's last file), the process's wall time, and the planner's prediction of the parameter bytes per rank
(internvl3_engine.planner.start_memory_bytes for the plan ``{}``). The checkpoint is made from the preset
with random weights unless ``--checkpoint`` gives one (transformers layout). Writes a JSON record and a
markdown table.

    python -m bench.start [--preset internvl3-1b] [--worlds 1,2,4] [--checkpoint DIR] [--out bench/results]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from internvl3_engine.cli import ArgumentParser

from .harness import command_line, device_info, provenance, utc_now, versions, write_record_and_table

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def make_checkpoint(preset: str, folder: Path) -> None:
    """The preset's architecture with random weights (float32), saved in the transformers layout; its image
    token id set to the byte tokenizer's, so the generated demo data trains on it."""
    from model import InternVL3, InternVL3Config
    from model.data import ByteTokenizer

    config = InternVL3Config.preset(preset)
    config.image_token_id = ByteTokenizer().img_context_id
    with torch.device("meta"):
        model = InternVL3(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder)


def run_world(world: int, checkpoint: Path, data: Path, work: Path, device: str) -> dict:
    """One dry run with export at world size ``world``: its ranks' reports, each with its peak RSS over the
    whole run (export_peak_host_bytes), the export's seconds and the launcher's wall time. The exported
    folder is removed afterwards."""
    output, export, peaks = work / f"w{world}", work / f"w{world}-export", work / f"w{world}-peaks"
    plan = work / "plan.json"
    plan.write_text("{}\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "bench.rank_peak", str(peaks), "model.train", "--init", str(checkpoint),
               "--plan", str(plan), "--data", str(data), "--output-dir", str(output), "--max-steps", "0",
               "--no-progress", "--export", str(export)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if completed.returncode != 0:
        return {"world": world, "status": "error", "error": (completed.stdout + completed.stderr)[-2000:]}
    report = output / "start.json"
    ranks = json.loads(report.read_text())["ranks"]
    for rank in ranks:
        rank["export_peak_host_bytes"] = json.loads((peaks / f"rank{rank['rank']}.json").read_text())["peak_host_bytes"]
    exported = list(export.iterdir())
    export_s = max(path.stat().st_mtime for path in exported) - report.stat().st_mtime
    export_bytes = sum(path.stat().st_size for path in exported if path.suffix == ".safetensors")
    shutil.rmtree(export)
    return {"world": world, "status": "ok", "wall_s": wall, "export_s": export_s, "export_bytes": export_bytes, "ranks": ranks}


def markdown(record: dict) -> str:
    lines = [
        f"# Sharded start and export: {record['preset']} ({record['checkpoint_bytes'] / GIB:.2f} GiB float32 checkpoint)",
        "",
        provenance(record),
        "",
        "| W | parameters / rank (GiB) | planner's prediction (GiB) | peak RSS after load / rank (GiB) | peak RSS with export / rank (GiB) | "
        "anonymous after load (GiB) | peak GPU (GiB) | start (s) | export (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['world']} | error: see the JSON | | | | | | | | |")
            continue

        def spread(key: str, scale: float = GIB) -> str:
            values = [rank[key] / scale for rank in row["ranks"] if rank.get(key) is not None]
            return "-" if not values else f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f}"

        lines.append(f"| {row['world']} | {spread('parameter_bytes')} | {row['predicted_parameter_bytes'] / GIB:.2f} | {spread('peak_host_bytes')} | "
                     f"{spread('export_peak_host_bytes')} | {spread('anon_bytes')} | {spread('peak_device_bytes')} | {spread('start_s', 1.0)} | "
                     f"{row['export_s']:.1f} | {row['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="internvl3-1b", help="the architecture (a model preset)")
    parser.add_argument("--worlds", default="1,2,4", type=lambda text: [int(w) for w in text.split(",")])
    parser.add_argument("--checkpoint", type=Path, help="a transformers-layout checkpoint (default: made from --preset)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if any(world < 1 for world in args.worlds):
        parser.error("--worlds: positive integers")
    from model.train.demo_data import DemoDataConfig, generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        checkpoint = args.checkpoint or work / "checkpoint"
        if args.checkpoint is None:
            print(f"bench.start: writing a random {args.preset} checkpoint", file=sys.stderr)
            make_checkpoint(args.preset, checkpoint)
        generate(str(work / "data"), seed=0, config=DemoDataConfig(train_images=4, eval_images=1, preference_pairs=1, image_size=56, train_videos=0, eval_videos=0))
        from internvl3_engine.parallel import ParallelPlan
        from internvl3_engine.planner import model_shape, start_memory_bytes

        shape = model_shape(Path(checkpoint) / "config.json")
        rows = []
        for world in args.worlds:
            print(f"bench.start: W = {world}", file=sys.stderr)
            row = run_world(world, checkpoint, work / "data" / "meta.json", work, device)
            row["predicted_parameter_bytes"] = start_memory_bytes(shape, ParallelPlan(), world)
            rows.append(row)
        size = sum(path.stat().st_size for path in Path(checkpoint).glob("*.safetensors"))
    date = utc_now()
    record = {"suite": "start", "preset": args.preset, "checkpoint_bytes": size, "date": date.strftime("%Y-%m-%d"),
              "device": device_info(torch.device(device)), "versions": versions(), "command": command_line(), "rows": rows}
    write_record_and_table(record, markdown(record), args.out / f"{date.strftime('%Y%m%dT%H%M%SZ')}_{device}_start-{args.preset}",
                           "bench.start")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
