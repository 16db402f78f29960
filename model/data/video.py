"""Video records as InternVL treats them: frames sampled from equal segments of the video (their middles, as
transformers' InternVL video processor and InternVL's evaluation do, or a random frame of each with a
random count between two bounds, as InternVL trains), each frame one tile (resized to the tile size, no
dynamic tiling), and the ``<video>`` placeholder replaced by ``Frame1: <image>`` ... one line per frame.
Read with PyAV (the ``av`` package), which the data workers call lazily, seeking to the keyframe before
each sampled frame (load_frames); a missing, unreadable or empty video is a DataError (skipped and counted
by the dataset).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable, Optional

import torch
from PIL import Image

from .conversation import IMAGE_PLACEHOLDER, DataError, SampleShape
from .tiling import normalize_tiles

VIDEO_PLACEHOLDER = "<video>"
FRAME_OFFSETS = ("middle", "random")

SEEK_MIN_GAP = 16
"""load_frames decodes forward to a frame at most this many frames past the last one decoded (or at most
the longest run of frames seen without a keyframe, when longer) instead of seeking: a seek restarts the
decoder at a keyframe, which saves nothing over a gap within one group of pictures."""

OFF_GRID = Fraction(1, 4)
"""How far (in frames) a frame's timestamp may lie from the frame rate's grid: timestamps rounded to a
coarse time base (milliseconds in Matroska) stay well within it; a variable frame rate does not."""


def sample_frame_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices of a video of ``total`` frames (all of them when it has fewer): the middle of
    each of ``count`` equal segments, (i + 1/2) * total / count rounded down, as transformers' InternVL video
    processor samples with its initial shift. Computed in integers: in floating point the middle of
    segment 7 of a 152-frame video in 12, exactly 95, comes out just below it."""
    if count < 1:
        raise ValueError(f"frames per video must be at least 1, got {count}")
    if total < 1:
        raise DataError("the video has no frames")
    count = min(count, total)
    return [(2 * index + 1) * total // (2 * count) for index in range(count)]


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
    """The RGB frames at ``indices`` (increasing) of the video at ``path``; frame n is the n-th frame in
    presentation order. Each wanted frame is reached by a seek to the keyframe at or before it, or by decoding
    forward when it is near (see SEEK_MIN_GAP): a frame of a long video costs about one group of pictures,
    not the frames before it. A video whose timestamps do not name its frames (no pts, a variable frame
    rate, a seek that lands after the frame) is decoded in order from its first frame instead."""
    container = _open(path)
    try:
        try:
            frames = _decode_seeking(container, indices)
        except _Unmapped:
            container.close()
            container = _open(path)
            frames = _decode_in_order(container, indices)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"corrupt video: {path} ({type(error).__name__}: {error})") from None
    finally:
        container.close()
    missing = [index for index in indices if index not in frames]
    if missing:
        raise DataError(f"corrupt video: {path} (frame {missing[0]} could not be decoded)")
    return [frames[index] for index in indices]


class _Unmapped(Exception):
    """The video's timestamps do not name its frames, or it cannot seek: it is to be decoded in order."""


class _FrameClock:
    """Frame numbers from presentation timestamps: frame n is shown at ``first + n * ticks``, ``first`` the
    first frame's pts and ``ticks`` the stream's time base units per frame (1 / (average_rate * time_base))."""

    def __init__(self, stream, first: Optional[int]):
        if first is None or not stream.average_rate or not stream.time_base:
            raise _Unmapped
        self.first = first
        self.ticks = 1 / (Fraction(stream.average_rate) * Fraction(stream.time_base))

    def number(self, frame) -> int:
        if frame.pts is None:
            raise _Unmapped
        exact = (frame.pts - self.first) / self.ticks
        number = round(exact)
        if abs(exact - number) > OFF_GRID:
            raise _Unmapped
        return number

    def pts(self, number: int) -> int:
        return self.first + math.floor(number * self.ticks)


def _rgb(frame) -> Image.Image:
    return frame.to_image().convert("RGB")


def _decode_seeking(container, indices: list[int]) -> dict:
    """{index: frame} for ``indices``, each reached by a seek or by decoding forward (see load_frames); raises
    _Unmapped when a decoded frame's number is not the one its order implies, or the video ends first."""
    stream = container.streams.video[0]
    decoded = container.decode(stream)
    current = next(decoded, None)
    if current is None:
        raise _Unmapped
    clock = _FrameClock(stream, current.pts)
    frames = {}
    position = last_key = keyless = 0  # the frame decoded last, the keyframe decoded last, the longest run seen without one
    for target in sorted(set(indices)):
        if target - position > max(keyless, SEEK_MIN_GAP):
            try:
                container.seek(clock.pts(target), backward=True, any_frame=False, stream=stream)
            except Exception:  # a container that cannot seek (av raises its own error types)
                raise _Unmapped from None
            decoded = container.decode(stream)
            current = next(decoded, None)
            if current is None:
                raise _Unmapped
            position = last_key = clock.number(current)
            if position > target:
                raise _Unmapped
            keyless = max(keyless, target - position)  # the seek's keyframe: none follows it up to the target
        while position < target:
            current = next(decoded, None)
            if current is None or clock.number(current) != position + 1:
                raise _Unmapped
            position += 1
            if current.key_frame:
                last_key = position
            keyless = max(keyless, position - last_key)
        frames[target] = _rgb(current)
    return frames


def _decode_in_order(container, indices: list[int]) -> dict:
    """{index: frame} for ``indices``, decoding every frame from the first up to the last wanted."""
    wanted, frames = set(indices), {}
    for number, frame in enumerate(container.decode(video=0)):
        if number in wanted:
            frames[number] = _rgb(frame)
        if number >= indices[-1]:
            break
    return frames
