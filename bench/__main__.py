"""``python -m bench``: time a suite, write a JSON record, markdown tables and GB/s and TFLOP/s plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from internvl3_engine.cli import ArgumentParser

from . import harness, kernels, report, train
from .ceilings import measure_ceilings

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SUITES = {"kernels": ("kernels",), "train": ("train",), "all": ("kernels", "train")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m bench",
        description="Time internvl3_engine's ops on every backend ('torch' = the PyTorch reference, 'triton', "
        "'cuda') and against other libraries' baselines, and a training step of the reference model, against "
        "the copy and matmul ceilings measured in the same run.",
    )
    parser.add_argument(
        "--suite", choices=tuple(SUITES), default="kernels",
        help="'kernels': every public op, forward and forward+backward, with baselines (torch SDPA, FlexAttention, "
        "FlashAttention, Liger-Kernel where they run); 'train': a training step of the reference model; "
        "'all': both",
    )
    parser.add_argument(
        "--sizes", choices=tuple(kernels.SIZES), default=None,
        help="'real': InternVL3 shapes (InternVL3-1B/2B for train); 'tiny': seconds on a CPU or the Triton "
        "interpreter (default: real on a GPU, tiny otherwise)",
    )
    parser.add_argument(
        "--ops", default=None, type=lambda text: set(text.split(",")),
        help="comma-separated op names to time in the kernels suite (default: all), e.g. v2pe_attention",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke test of the harness: one timed call per row on CPU, short do_bench runs on GPU",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def _publish_hint(files: list[Path]) -> str:
    names = " ".join(str(path) for path in files)
    return (
        "bench: to publish these results: review the .md (and the notes of any skipped or error rows), then\n"
        f"  git add {names}\n"
        "  and copy the .md's tables for the ops with targets (v2pe_attention, linear_cross_entropy, the training "
        "step) into the 'Latest results' section of bench/results/README.md, with the device and date."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # An index-less "cuda" means the current device (torch 2.11's set_device rejects it).
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    sizes = args.sizes or ("real" if device.type == "cuda" else "tiny")
    unknown = (args.ops or set()) - {spec.name for spec in kernels.OPS}
    if unknown:
        print(f"bench: unknown op(s) {sorted(unknown)}; choose from {[spec.name for spec in kernels.OPS]}", file=sys.stderr)
        return 2
    suites = SUITES[args.suite]
    started = harness.utc_now()
    timer = harness.Timer(device, quick=args.quick)
    info = harness.device_info(device)  # clocks read before the load starts

    print(f"bench: {info['name']}, {args.suite} suite, {sizes} sizes; measuring ceilings", file=sys.stderr)
    ceilings = measure_ceilings(device, timer, info)
    results, train_rows = [], []
    if "kernels" in suites:
        results = kernels.run_kernels(device, sizes, timer, progress=lambda items: tqdm(items, desc="kernels"),
                                      ops=args.ops)
        kernels.add_rates(results, ceilings)
    if "train" in suites:
        train_rows = train.run_train(device, sizes, timer, ceilings, progress=lambda items: tqdm(items, desc="train"))

    record = {
        "schema": harness.RECORD_SCHEMA,
        "suite": args.suite,
        "suites_run": list(suites),
        "sizes": sizes,
        "date_utc": started.isoformat(timespec="seconds"),
        "command": harness.command_line(),
        "device": info,
        "versions": harness.versions(),
        "environment": harness.environment(),
        "timing": {"method": timer.method, "l2_bytes": harness.l2_bytes(device)},
        "ceilings": ceilings,
        "results": results,
        "train": train_rows,
    }
    stem = args.out / harness.record_stem(started, info, args.suite, sizes)
    files = [harness.write_record(record, stem.with_suffix(".json"))]
    files.append(stem.with_suffix(".md"))
    files[-1].write_text(report.markdown(record))
    files += report.plot(record, stem)
    print(f"bench: wrote {', '.join(path.name for path in files)} in {args.out}", file=sys.stderr)
    if sizes == "real":
        print(_publish_hint(files), file=sys.stderr)

    errors = [row for row in results + train_rows if row["status"] == "error"]
    for row in errors:
        where = f"{row['op']} {row['case']} {row['direction']}" if "op" in row else row["case"]
        print(f"bench: ERROR {where} [{row['implementation']}]: {row['reason']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
