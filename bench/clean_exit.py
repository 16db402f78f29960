"""How often a torchrun launch of the trainer ends cleanly: the same launch repeated N times in a row.

A job that did all its work must exit 0 on every rank: a rank that aborts at interpreter exit (a thread
left joinable, a process group never destroyed) makes torchrun kill the others and report the job failed.
Each case is launched ``--times`` times with every rank's stdout and stderr kept in files (torchrun's
``--log-dir`` with ``--redirects 3``); a failed launch's record holds its exit status and the tail of each
rank's stderr. Cases:

- ``dry-w2``, ``dry-w4``: the sharded-start dry run (``--preset tiny --init CKPT --plan {} --max-steps 0``)
  at W = 2 and 4, from a random tiny checkpoint on a small generated data folder;
- ``train-w2``: 3 steps at W = 2 under the plan ``{}`` with asynchronous checkpoints after every step.

    python -m bench.clean_exit [--times 50] [--cases dry-w2,dry-w4,train-w2] [--out bench/results]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from internvl3_engine.cli import ArgumentParser

from .harness import command_line, device_info, provenance, utc_now, versions, write_record_and_table
from .start import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "dry-w2": (2, ["--max-steps", "0"]),
    "dry-w4": (4, ["--max-steps", "0"]),
    "train-w2": (2, ["--max-steps", "3", "--save-every", "1", "--log-every", "1"]),
}


def launch(world: int, flags: list[str], checkpoint: Path, data: Path, work: Path) -> dict:
    """One torchrun launch of the trainer in a fresh output folder: its exit status, wall time and, when it
    failed, the tail of each rank's stderr."""
    plan = work / "plan.json"
    plan.write_text("{}\n")
    output, logs = Path(tempfile.mkdtemp(dir=work, prefix="run")), Path(tempfile.mkdtemp(dir=work, prefix="logs"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "--log-dir", str(logs), "--redirects", "3",
               "-m", "model.train", "--preset", "tiny", "--init", str(checkpoint), "--plan", str(plan),
               "--data", str(data), "--output-dir", str(output), "--no-progress", *flags]
    began = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    run = {"status": completed.returncode, "wall_s": time.perf_counter() - began}
    if completed.returncode != 0:
        run["launcher"] = completed.stderr[-1500:]
        run["ranks"] = {str(path.relative_to(logs)): path.read_text(errors="replace")[-1500:]
                        for path in sorted(logs.rglob("stderr.log"))}
    return run


def markdown(record: dict) -> str:
    lines = [
        "# Clean exits: torchrun launches of the trainer repeated",
        "",
        provenance(record),
        "",
        "| case | launches | exited 0 | failed (exit status) | mean wall (s) |",
        "|---|---|---|---|---|",
    ]
    for name, runs in record["cases"].items():
        failed = [run["status"] for run in runs if run["status"] != 0]
        wall = sum(run["wall_s"] for run in runs) / len(runs)
        lines.append(f"| {name} | {len(runs)} | {len(runs) - len(failed)} | {', '.join(map(str, failed)) or '-'} | {wall:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.clean_exit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=50, help="launches per case")
    parser.add_argument("--cases", default=",".join(CASES), type=lambda text: text.split(","))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.times < 1:
        parser.error("--times: a positive integer")
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    from model.train.demo_data import DemoDataConfig, generate

    cases: dict = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        make_checkpoint("tiny", work / "checkpoint")
        generate(str(work / "data"), seed=0, config=DemoDataConfig(train_images=8, eval_images=1, preference_pairs=1, image_size=56,
                                                                   train_videos=0, eval_videos=0))
        for name in args.cases:
            world, flags = CASES[name]
            cases[name] = []
            for attempt in range(args.times):
                run = launch(world, flags, work / "checkpoint", work / "data" / "meta.json", work)
                cases[name].append(run)
                print(f"bench.clean_exit: {name} {attempt + 1}/{args.times}: exit {run['status']} ({run['wall_s']:.1f} s)", file=sys.stderr)
    date = utc_now()
    record = {"suite": "clean-exit", "date": date.strftime("%Y-%m-%d"), "device": device_info(torch.device("cpu")),
              "versions": versions(), "command": command_line(), "times": args.times, "cases": cases}
    write_record_and_table(record, markdown(record), args.out / f"{date.strftime('%Y%m%dT%H%M%SZ')}_cpu_clean-exit", "bench.clean_exit")
    return 0 if all(run["status"] == 0 for runs in cases.values() for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
