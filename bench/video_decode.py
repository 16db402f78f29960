"""Decoding the sampled frames of a long video against a short one: model.data.video.load_frames (a seek to
the keyframe before each frame) and, as the baseline, every frame decoded in order up to the last sampled.

Two clips are written with PyAV (H.264 when PyAV has libx264, else MPEG-4 Part 2), ``--size`` pixels square
at ``--fps``, a keyframe every ``--gop`` frames, a textured pattern drifting across the frame: a long one
(``--long-seconds``) and a short one (``--short-seconds``). For each, the time to decode ``--frames`` frames
at the segments' middles (sample_frame_indices) is the median wall time of bench.harness.Timer on the CPU.
The target: the long clip within 3x of the short one's time.

    python -m bench.video_decode [--long-seconds 600] [--short-seconds 10] [--fps 30] [--gop 250] [--size 128] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from internvl3_engine.cli import ArgumentParser

from .harness import Timer, command_line, device_info, provenance, utc_now, versions, write_record_and_table

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0


def write_clip(path: Path, frames: int, fps: int, gop: int, size: int, codec: str) -> None:
    """A clip of ``frames`` frames: a random texture (seeded) drifting one pixel a frame, keyframes every ``gop``."""
    import av

    texture = np.random.default_rng(0).integers(0, 256, (2 * size, 2 * size, 3), dtype=np.uint8)
    container = av.open(str(path), mode="w")
    stream = container.add_stream(codec, rate=fps)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    for index in range(frames):
        shift = index % size
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[shift:shift + size, shift:shift + size]), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def decode_in_order(path: str, indices: list[int]) -> None:
    """The baseline: every frame decoded from the first up to the last of ``indices`` (load_frames' path for a
    video whose timestamps do not name its frames)."""
    from model.data.video import _decode_in_order, _open

    container = _open(path)
    try:
        _decode_in_order(container, indices)
    finally:
        container.close()


def clip_row(path: Path, seconds: float, frames: int, timer: Timer) -> dict:
    from model.data.video import load_frames, sample_frame_indices, video_frame_count

    total = video_frame_count(str(path))
    indices = sample_frame_indices(total, frames)
    calls = {"seek_ms": lambda: load_frames(str(path), indices), "in_order_ms": lambda: decode_in_order(str(path), indices)}
    row = {"seconds": seconds, "frames": total, "bytes": os.path.getsize(path), "indices": indices}
    for name, call in calls.items():
        call()  # untimed: the Timer's quick mode times the call after it
        row[name] = timer.median_ms(call)
    return row


def markdown(record: dict) -> str:
    lines = [
        "# Video decoding: sampled frames of a long clip against a short one",
        "",
        provenance(record),
        "",
        f"{record['codec']}, {record['size']}x{record['size']}, {record['fps']} fps, a keyframe every {record['gop']} frames; "
        f"{record['sampled']} frames at the segments' middles; {record['timing']}:",
        "",
        "| clip | frames | load_frames (ms) | in order to the last (ms) |",
        "|---|---|---|---|",
    ]
    for row in record["clips"]:
        lines.append(f"| {row['seconds']:g} s | {row['frames']} | {row['seek_ms']:.1f} | {row['in_order_ms']:.1f} |")
    met = "met" if record["ratio"] <= TARGET_RATIO else "not met"
    lines += ["", f"long / short: {record['ratio']:.2f}x with load_frames, {record['in_order_ratio']:.1f}x in order "
              f"(target <= {TARGET_RATIO:g}x: {met})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.video_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long-seconds", type=float, default=600.0)
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=250, help="frames from one keyframe to the next")
    parser.add_argument("--size", type=int, default=128, help="width and height in pixels")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--quick", action="store_true", help="one timed call per clip and way: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not 0 < args.short_seconds <= args.long_seconds:
        parser.error("--short-seconds must be positive and at most --long-seconds")
    if min(args.fps, args.gop, args.size, args.frames) < 1 or args.size % 2:
        parser.error("--fps, --gop and --frames must be >= 1, --size even and >= 2")
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    timer = Timer(torch.device("cpu"), quick=args.quick)
    clips = []
    with tempfile.TemporaryDirectory() as temporary:
        for seconds in (args.long_seconds, args.short_seconds):
            path = Path(temporary) / f"clip-{seconds:g}s.mp4"
            print(f"bench.video_decode: writing and timing the {seconds:g} s clip", file=sys.stderr)
            write_clip(path, round(seconds * args.fps), args.fps, args.gop, args.size, codec)
            clips.append(clip_row(path, seconds, args.frames, timer))
    long, short = clips
    date = utc_now()
    record = {"suite": "video_decode", "date": date.strftime("%Y-%m-%d"), "device": device_info(torch.device("cpu")),
              "versions": {**versions(), "av": av.__version__}, "command": command_line(), "codec": codec, "fps": args.fps,
              "gop": args.gop, "size": args.size, "sampled": args.frames, "timing": timer.method, "clips": clips,
              "ratio": long["seek_ms"] / short["seek_ms"], "in_order_ratio": long["in_order_ms"] / short["in_order_ms"],
              "target_ratio": TARGET_RATIO}
    write_record_and_table(record, markdown(record), args.out / f"{date.strftime('%Y%m%dT%H%M%SZ')}_cpu_video-decode",
                           "bench.video_decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
