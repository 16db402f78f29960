"""Per-rank data loading of the trainer: images decoded at each world size for the same global batch, and
the cost of a resume at an early and a late step.

1. Decoding: the demo preset's data and model for ``--steps`` steps with a global batch of ``--packs``
   packs: one process accumulating them, then W ranks (torchrun, gloo, the plan ``{}``) taking
   packs / W each; the record keeps the image files the ranks' workers decoded together (``images_decoded``
   of the last metrics line), each run's wall time and its longest wait for data.
2. Resume: one process trains ``--resume-late`` steps, saving every ``--resume-early`` steps; then a fresh
   trainer resumes from the early and from the late checkpoint: the record keeps the seconds to build it
   (model, data index from its cache, loader), to restore the checkpoint, and to take the first step after
   it (the workers' start and the step's decoding included), and the images that first step decoded.

    python -m bench.data_loading [--worlds 2,4] [--steps 8] [--packs 4] [--resume-early 2] [--resume-late 40]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from internvl3_engine.cli import ArgumentParser

from .harness import command_line, device_info, provenance, utc_now, versions, write_record_and_table

ROOT = Path(__file__).resolve().parents[1]


def _last_step(output: Path) -> dict:
    from model.train.metrics import read_metrics

    return [entry for entry in read_metrics(str(output / "metrics.jsonl")) if "event" not in entry][-1]


def decoding_row(world: int, data: Path, work: Path, steps: int, packs: int) -> dict:
    """One run of ``steps`` steps of ``packs`` packs over ``world`` ranks (1: no torchrun, no plan)."""
    output = work / f"decode-w{world}"
    config = work / f"decode-w{world}.json"
    config.write_text(json.dumps({"grad_accum": packs // world, "logging": {"log_every": steps, "log": []},
                                  "checkpoint": {"save_every": 10**6}}))
    train = ["-m", "model.train", "--preset", "demo", "--config", str(config), "--data", str(data), "--output-dir", str(output),
             "--max-steps", str(steps), "--no-progress"]
    if world > 1:
        plan = work / "plan.json"
        plan.write_text("{}\n")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *train,
                   "--plan", str(plan)]
    else:
        command = [sys.executable, *train]
    began = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if completed.returncode != 0:
        return {"world": world, "status": "error", "error": (completed.stdout + completed.stderr)[-2000:]}
    last = _last_step(output)
    return {"world": world, "status": "ok", "packs_per_rank": packs // world, "images_decoded": last["images_decoded"],
            "wall_s": wall, "data_wait_s_last_step": last["data_wait_s"]}


def resume_rows(data: Path, work: Path, early: int, late: int) -> list[dict]:
    """Checkpoints at ``early`` and ``late`` from one run, then a timed resume from each."""
    from model.train.presets import preset_config
    from model.train.trainer import Trainer

    def config(steps: int):
        return preset_config("demo").updated({"data": {"path": str(data)}, "output_dir": str(work / "resume"), "max_steps": steps,
                                              "logging": {"log": [], "eval_file": None},
                                              "checkpoint": {"save_every": early, "keep_last": late // early + 1}})

    quiet = {"show_progress": False, "echo": lambda message: None}
    Trainer(config(late), **quiet).train()
    rows = []
    for step in (early, late):
        began = time.perf_counter()
        trainer = Trainer(config(step + 1), resume=str(work / "resume" / "checkpoints" / f"step_{step:08d}"), **quiet)
        built = time.perf_counter()
        trainer._resume_point()
        restored = time.perf_counter()
        result = trainer.train_step()
        stepped = time.perf_counter()
        trainer._stop_loader()
        rows.append({"resumed_at": step, "build_s": built - began, "restore_s": restored - built,
                     "first_step_s": stepped - restored, "first_step_images_decoded": result.images_decoded})
    return rows


def markdown(record: dict) -> str:
    lines = [
        "# Per-rank data loading (demo preset)",
        "",
        provenance(record),
        "",
        f"Images decoded for {record['steps']} steps of {record['packs']} packs (the same global batch at every W):",
        "",
        "| W | packs / rank | images decoded (all ranks) | wall (s) |",
        "|---|---|---|---|",
    ]
    for row in record["decoding"]:
        if row["status"] != "ok":
            lines.append(f"| {row['world']} | error: see the JSON | | |")
            continue
        lines.append(f"| {row['world']} | {row['packs_per_rank']} | {row['images_decoded']} | {row['wall_s']:.1f} |")
    lines += ["", "Resume of one process (the data index cached, the loader restored from the checkpoint):", "",
              "| resumed at step | build (s) | restore (s) | first step (s) | images decoded by it |", "|---|---|---|---|---|"]
    for row in record["resume"]:
        lines.append(f"| {row['resumed_at']} | {row['build_s']:.2f} | {row['restore_s']:.3f} | {row['first_step_s']:.2f} | "
                     f"{row['first_step_images_decoded']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.data_loading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4", type=lambda text: [int(w) for w in text.split(",")], help="world sizes beside 1")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--packs", type=int, default=4, help="packs per step (the global batch); each world size must divide it")
    parser.add_argument("--resume-early", type=int, default=2)
    parser.add_argument("--resume-late", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if any(world < 2 or args.packs % world for world in args.worlds):
        parser.error("--worlds: integers >= 2 that divide --packs")
    if not 0 < args.resume_early < args.resume_late or args.resume_late % args.resume_early:
        parser.error("--resume-late must be a multiple of --resume-early > 0")
    from model.train.demo_data import generate

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        generate(str(work / "data"), seed=0)
        data = work / "data" / "meta.json"
        decoding = []
        for world in [1, *args.worlds]:
            print(f"bench.data_loading: decoding, W = {world}", file=sys.stderr)
            decoding.append(decoding_row(world, data, work, args.steps, args.packs))
        print("bench.data_loading: resume", file=sys.stderr)
        resume = resume_rows(data, work, args.resume_early, args.resume_late)
    date = utc_now()
    record = {"suite": "data_loading", "date": date.strftime("%Y-%m-%d"), "device": device_info(torch.device("cpu")),
              "versions": versions(), "command": command_line(),
              "steps": args.steps, "packs": args.packs, "decoding": decoding, "resume": resume}
    write_record_and_table(record, markdown(record), args.out / f"{date.strftime('%Y%m%dT%H%M%SZ')}_cpu_data-loading",
                           "bench.data_loading")
    return 0 if all(row["status"] == "ok" for row in decoding) else 1


if __name__ == "__main__":
    sys.exit(main())
