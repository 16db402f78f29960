"""Video records as transformers' InternVL processor treats them: frames sampled uniformly from the middle of
equal segments, each frame one tile (resized to the tile size, no dynamic tiling), and the ``<video>``
placeholder replaced by ``Frame1: <image>`` ... one line per frame. Read with PyAV (the ``av`` package),
which the data workers call lazily; a missing, unreadable or empty video is a DataError (skipped and
counted by the dataset).
"""

from __future__ import annotations

import torch
from PIL import Image

from .conversation import IMAGE_PLACEHOLDER, DataError
from .tiling import normalize_tiles

VIDEO_PLACEHOLDER = "<video>"


def sample_frame_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices of a video of ``total`` frames (all of them when it has fewer): the middle of
    each of ``count`` equal segments, i + 1/2 segment lengths truncated, as transformers' InternVL video
    processor samples with its initial shift."""
    if count < 1:
        raise ValueError(f"frames per video must be at least 1, got {count}")
    if total < 1:
        raise DataError("the video has no frames")
    count = min(count, total)
    step = total / count
    return [int(step / 2 + index * step) for index in range(count)]


def video_prompt(frames: int) -> str:
    """What ``<video>`` becomes for a video of ``frames`` sampled frames."""
    return "\n".join(f"Frame{index + 1}: {IMAGE_PLACEHOLDER}" for index in range(frames))


def with_video_prompt(text: str, frames: int) -> str:
    """``text`` with its ``<video>`` placeholder (put in front, on a line of its own, when absent) replaced
    by the prompt of ``frames`` frames."""
    if VIDEO_PLACEHOLDER not in text:
        text = f"{VIDEO_PLACEHOLDER}\n{text}"
    return text.replace(VIDEO_PLACEHOLDER, video_prompt(frames))


def frame_tiles(frames: list[Image.Image], tile_size: int) -> list[torch.Tensor]:
    """One normalised tile per frame, [1, 3, tile_size, tile_size] each: the frame resized (bicubic) to the
    tile, without dynamic tiling."""
    return [normalize_tiles([frame.resize((tile_size, tile_size), Image.BICUBIC)]) for frame in frames]


def read_video(path: str, frames: int) -> list[Image.Image]:
    """The ``frames`` frames sampled from the video at ``path`` (fewer when it has fewer)."""
    return load_frames(path, sample_frame_indices(video_frame_count(path), frames))


def _open(path: str):
    try:
        import av
    except ImportError as error:
        raise ImportError("reading video records needs PyAV: pip install av") from error
    try:
        return av.open(path)
    except FileNotFoundError:
        raise DataError(f"missing video: {path}") from None
    except Exception as error:  # av raises its own error types for unreadable files
        raise DataError(f"corrupt video: {path} ({type(error).__name__}: {error})") from None


def video_frame_count(path: str) -> int:
    """The number of frames of the video at ``path`` from its container (the stream's frame count, else its
    packets counted without decoding)."""
    container = _open(path)
    try:
        if not container.streams.video:
            raise DataError(f"corrupt video: {path} (no video stream)")
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"corrupt video: {path} ({type(error).__name__}: {error})") from None
    finally:
        container.close()


def load_frames(path: str, indices: list[int]) -> list[Image.Image]:
    """The RGB frames at ``indices`` (increasing) of the video at ``path``, decoded in order up to the last."""
    wanted, frames = set(indices), {}
    container = _open(path)
    try:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                frames[number] = frame.to_image().convert("RGB")
            if number >= indices[-1]:
                break
    except Exception as error:
        raise DataError(f"corrupt video: {path} ({type(error).__name__}: {error})") from None
    finally:
        container.close()
    missing = [index for index in indices if index not in frames]
    if missing:
        raise DataError(f"corrupt video: {path} (frame {missing[0]} could not be decoded)")
    return [frames[index] for index in indices]
