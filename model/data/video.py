"""Video records as InternVL treats them: frames sampled from equal segments of the video (their middles, as
transformers' InternVL video processor and InternVL's evaluation do, or a random frame of each with a
random count between two bounds, as InternVL trains), each frame one tile (resized to the tile size, no
dynamic tiling), and the ``<video>`` placeholder replaced by ``Frame1: <image>`` ... one line per frame.
Read with PyAV (the ``av`` package), which the data workers call lazily; a missing, unreadable or empty
video is a DataError (skipped and counted by the dataset).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from PIL import Image

from .conversation import IMAGE_PLACEHOLDER, DataError, SampleShape
from .tiling import normalize_tiles

VIDEO_PLACEHOLDER = "<video>"
FRAME_OFFSETS = ("middle", "random")


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


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video a sample takes: a count drawn uniformly from [min_frames, max_frames]
    (InternVL's min_num_frame / max_num_frame; equal bounds: a fixed count), never more than the video
    has, one frame from each of that many equal segments: its middle (``offsets="middle"``, as
    sample_frame_indices) or a uniformly drawn frame of it (``"random"``, InternVL's training sampling).
    The draws come from the ``rng`` given, the count first; without one: ``min_frames`` frames at the
    segments' middles (what the data index measures)."""

    min_frames: int = 8
    max_frames: int = 8
    offsets: str = "middle"

    def __post_init__(self):
        if not (isinstance(self.min_frames, int) and self.min_frames >= 1):
            raise ValueError(f"min_frames (the least frames sampled per video) must be an integer >= 1, got {self.min_frames!r}")
        if not (isinstance(self.max_frames, int) and self.max_frames >= self.min_frames):
            raise ValueError(f"max_frames must be an integer >= min_frames ({self.min_frames}), got {self.max_frames!r}")
        if self.offsets not in FRAME_OFFSETS:
            raise ValueError(f"offsets must be one of {FRAME_OFFSETS}, got {self.offsets!r}")

    @classmethod
    def fixed(cls, frames: int) -> "FrameSampling":
        """``frames`` frames at the segments' middles: transformers' processor with num_frames=frames."""
        return cls(frames, frames)

    @classmethod
    def of(cls, video_frames) -> "FrameSampling":
        """``video_frames`` as a FrameSampling: one already, or a fixed count (an int)."""
        if isinstance(video_frames, cls):
            return video_frames
        if isinstance(video_frames, int) and not isinstance(video_frames, bool):
            if video_frames < 1:
                raise ValueError(f"video_frames must be at least 1, got {video_frames}")
            return cls.fixed(video_frames)
        raise TypeError(f"video_frames must be an int or a FrameSampling, got {type(video_frames).__name__}")

    def count(self, total: int, rng: Optional[random.Random] = None) -> int:
        """How many frames of a video of ``total`` frames a sample takes."""
        if total < 1:
            raise DataError("the video has no frames")
        drawn = rng.randint(self.min_frames, self.max_frames) if rng is not None and self.max_frames > self.min_frames else self.min_frames
        return min(drawn, total)

    def indices(self, total: int, rng: Optional[random.Random] = None) -> list[int]:
        """The sampled frame indices, increasing."""
        count = self.count(total, rng)
        if self.offsets == "middle" or rng is None:
            return sample_frame_indices(total, count)
        bounds = [segment * total // count for segment in range(count + 1)]  # every segment holds a frame: count <= total
        return [rng.randrange(start, end) for start, end in zip(bounds, bounds[1:])]


def frame_separator(frame: int) -> str:
    """The text before frame ``frame``'s image (counted from 1) in a video prompt."""
    return f"Frame{frame}: " if frame == 1 else f"\nFrame{frame}: "


def video_prompt(frames: int) -> str:
    """What ``<video>`` becomes for a video of ``frames`` sampled frames."""
    return "".join(frame_separator(frame) + IMAGE_PLACEHOLDER for frame in range(1, frames + 1))


def with_frames(shape: SampleShape, frames: int, separator_tokens: Callable[[int], int], frame_tokens: int) -> SampleShape:
    """The shape of a video sample of ``shape`` (its images: the video's first frames, one tile each) with
    ``frames`` frames instead: each added frame's separator (``separator_tokens(frame)`` tokens) and image
    (``frame_tokens``, <img> and </img> included) go after the last frame, moving what follows (the first
    target too, when it comes after the video). Equal to measuring the sample with that many frames, since
    the text between two images is tokenized on its own."""
    have = len(shape.spans)
    if not 1 <= have <= frames:
        raise ValueError(f"a shape of {have} frames cannot grow to {frames}")
    spans = list(shape.spans)
    end = spans[-1][1]
    for frame in range(have + 1, frames + 1):
        start = end + separator_tokens(frame)
        end = start + frame_tokens
        spans.append((start, end))
    added = end - spans[have - 1][1]
    first_target = shape.first_target + added if shape.first_target >= spans[have - 1][1] else shape.first_target
    return replace(shape, length=shape.length + added, first_target=first_target, spans=spans,
                   tiles_per_image=list(shape.tiles_per_image) + [1] * (frames - have))


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
    """The ``frames`` frames sampled at the segments' middles from the video at ``path`` (fewer when it has
    fewer)."""
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
