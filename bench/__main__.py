"""``python -m bench``: time a suite, write a JSON record, a markdown table and a GB/s plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import harness, kernels, report
from .ceilings import measure_ceilings

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time internvl3_engine's ops on every backend ('torch' = PyTorch eager baseline, 'triton', "
        "'cuda') against the copy and matmul ceilings measured in the same run.",
    )
    parser.add_argument(
        "--suite", choices=("kernels", "all"), default="kernels",
        help="'kernels': every public op, forward and forward+backward. 'all' is the kernels suite for now: "
        "the training-step suite needs the reference model, which is not written yet.",
    )
    parser.add_argument(
        "--sizes", choices=tuple(kernels.SIZES), default=None,
        help="'real': InternVL3 shapes; 'tiny': seconds on a CPU or the Triton interpreter "
        "(default: real on a GPU, tiny otherwise)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = args.sizes or ("real" if device.type == "cuda" else "tiny")
    started = harness.utc_now()
    timer = harness.Timer(device)
    info = harness.device_info(device)  # clocks read before the load starts

    print(f"bench: {info['name']}, {args.suite} suite, {sizes} sizes; measuring ceilings", file=sys.stderr)
    ceilings = measure_ceilings(device, timer)
    results = kernels.run_kernels(device, sizes, timer, progress=lambda items: tqdm(items, desc="kernels"))
    kernels.add_rates(results, ceilings["copy"]["gb_per_s"])

    record = {
        "schema": harness.RECORD_SCHEMA,
        "suite": args.suite,
        "suites_run": ["kernels"],
        "sizes": sizes,
        "date_utc": started.isoformat(timespec="seconds"),
        "command": harness.command_line(),
        "device": info,
        "versions": harness.versions(),
        "environment": harness.environment(),
        "timing": {"method": timer.method, "l2_bytes": harness.l2_bytes(device)},
        "ceilings": ceilings,
        "results": results,
    }
    stem = args.out / harness.record_stem(started, info, args.suite, sizes)
    harness.write_record(record, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(report.markdown(record))
    report.plot(record, stem.with_suffix(".png"))
    print(f"bench: wrote {stem}.json, .md and .png", file=sys.stderr)

    errors = [row for row in results if row["status"] == "error"]
    for row in errors:
        print(f"bench: ERROR {row['op']} {row['case']} {row['direction']} [{row['backend']}]: {row['reason']}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
