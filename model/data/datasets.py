"""InternVL's dataset formats: the meta JSON, conversation / text-only / preference JSONL files.

Meta JSON: {"name": {"root": image folder, "annotation": JSONL path, "repeat_time": float, "length": int,
optional "data_augment": bool, "kind": "conversation"|"text"|"preference", "modality":
"language"|"multimodal", "weight": float}}; relative paths are taken from the meta file's folder.

Records (one JSON object a line):
- conversation: {"image": path | [paths] | absent, "conversations": [{"from": "human"|"gpt", "value": ...}]}
  (n images share the tile budget: each is tiled with at most max_num // n tiles, as InternVL does), or
  with {"video": path} instead of images: frames sampled (a FrameSampling), one tile each, ``<video>``
  (prepended to the first human turn when absent) replaced by ``Frame1: <image>`` lines (model/data/video.py)
- text-only: {"text": ...} (or a conversation without images)
- preference (MPO): {"image": ..., "question" or "prompt": ..., "chosen": ..., "rejected": ..., optional
  "ref_chosen_logp" and "ref_rejected_logp": the reference model's log-probabilities, precomputed}

A malformed record or a missing or corrupt image is skipped and counted in a DataErrors with its file
and line (once, however often it is read); iteration goes on. repeat_time < 1 keeps a seeded subsample,
> 1 repeats (the fractional part as a seeded subsample), and each epoch is shuffled from (seed, dataset
name, epoch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .conversation import ConversationEncoder, DataError, PreferencePair, Sample, SampleShape
from .tiling import ImageTiler, image_size, load_image
from .video import VIDEO_PLACEHOLDER, FrameSampling, frame_separator, frame_tiles, load_frames, video_frame_count, with_frames, with_video_prompt

KINDS = ("conversation", "text", "preference")
REFERENCE_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")  # a preference record's precomputed reference log-probs
MODALITIES = ("language", "multimodal")
Item = Union[Sample, PreferencePair]


def seeded_rng(*parts) -> random.Random:
    """A Random seeded from the parts' text (str seeds hash with SHA-512: the same on every run and
    platform, independent of PYTHONHASHSEED)."""
    return random.Random(":".join(str(part) for part in parts))


def seeded_generator(*parts) -> np.random.Generator:
    """A numpy Generator seeded from the SHA-256 of the parts' text (as seeded_rng: the same on every run,
    rank and platform, with one numpy version)."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass
class DataErrors:
    """Records skipped by the loader: ``total`` distinct records (a (file, line) counts once however often
    the stream reads it, e.g. again after its dataset wraps around), ``occurrences`` every skip, distinct
    records per reason, and the first ``keep`` distinct (file, line, reason)."""

    keep: int = 50
    total: int = 0
    occurrences: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    records: dict = field(default_factory=dict)  # file -> the set of its bad line numbers
    journal: Optional[list] = None  # when a list: every skip appended as (file, line, reason), for the owner to pass on

    def record(self, file: str, line: int, reason: str) -> None:
        if self.journal is not None:
            self.journal.append((file, line, reason))
        self.occurrences += 1
        lines = self.records.setdefault(file, set())
        if line in lines:
            return
        lines.add(line)
        self.total += 1
        self.by_reason[reason.split(":", 1)[0]] += 1
        if len(self.examples) < self.keep:
            self.examples.append((file, line, reason))

    def __len__(self) -> int:
        return self.total

    def take_journal(self) -> list:
        """The skips journaled since the last call (journaling must be on: ``journal=[]``)."""
        if self.journal is None:
            raise ValueError("this DataErrors keeps no journal (create it with journal=[])")
        taken, self.journal = self.journal, []
        return taken

    def summary(self) -> str:
        if not self.total:
            return "data errors: none"
        again = f" ({self.occurrences} skips: some were read more than once)" if self.occurrences > self.total else ""
        lines = [f"data errors: {self.total} records skipped{again}"]
        lines += [f"  {count} x {reason}" for reason, count in self.by_reason.most_common()]
        lines += [f"  {file}:{line}: {reason}" for file, line, reason in self.examples]
        if self.total > len(self.examples):
            lines.append(f"  ... {self.total - len(self.examples)} more")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {
            "total": self.total,
            "occurrences": self.occurrences,
            "by_reason": dict(self.by_reason),
            "examples": [list(e) for e in self.examples],
            "records": {file: sorted(lines) for file, lines in self.records.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict exactly. An older state (no "records"; its total counted every skip) keeps
        its counts, with occurrences equal to that total, and its examples become the known bad records."""
        self.total = int(state["total"])
        self.occurrences = int(state.get("occurrences", self.total))
        self.by_reason = Counter(state["by_reason"])
        self.examples = list(dict.fromkeys(tuple(e) for e in state["examples"]))  # an older state repeats some
        known = state["records"].items() if "records" in state else [(file, [line]) for file, line, _ in self.examples]
        self.records = {}
        for file, lines in known:
            self.records.setdefault(file, set()).update(int(line) for line in lines)


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of a meta JSON."""

    name: str
    annotation: str
    root: str = ""
    repeat_time: float = 1.0
    length: Optional[int] = None
    data_augment: bool = False
    kind: Optional[str] = None
    modality: Optional[str] = None
    weight: Optional[float] = None

    def __post_init__(self):
        if not (self.repeat_time > 0 and math.isfinite(self.repeat_time)):
            raise ValueError(f"dataset {self.name!r}: repeat_time must be positive, got {self.repeat_time}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"dataset {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"dataset {self.name!r}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.weight is not None and not self.weight >= 0:
            raise ValueError(f"dataset {self.name!r}: weight must be >= 0, got {self.weight}")


# The settings of a dataset in a meta file (InternVL's names), and those of InternVL's that are read and ignored
# with a warning.
META_KEYS = frozenset({"root", "annotation", "repeat_time", "length", "data_augment", "kind", "modality", "weight"})
IGNORED_META_KEYS = frozenset({"max_dynamic_patch"})


def load_meta(path: str) -> list[DatasetSpec]:
    """The datasets of a meta JSON file, in file order."""
    with open(path, encoding="utf-8") as handle:
        try:
            meta = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: a meta file maps dataset names to their settings")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise ValueError(f"{path}: dataset {name!r} needs an 'annotation' path")
        unknown = sorted(set(entry) - META_KEYS - IGNORED_META_KEYS)
        if unknown:
            raise ValueError(f"{path}: dataset {name!r} has unknown settings {unknown}; known: {sorted(META_KEYS)}")
        for key in sorted(set(entry) & IGNORED_META_KEYS):
            warnings.warn(f"{path}: dataset {name!r}: {key} is not supported (the data settings' max_num applies to every "
                          "dataset); ignored", stacklevel=2)
        settings = {key: value for key, value in entry.items() if key in META_KEYS}
        for key, kinds, what in (("annotation", str, "a path"), ("root", str, "a path"), ("repeat_time", (int, float), "a number"),
                                 ("data_augment", bool, "true or false")):
            value = settings.get(key)
            if value is not None and (not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool))):
                raise ValueError(f"{path}: dataset {name!r}: {key} must be {what}, got {value!r}")
        settings["annotation"] = os.path.join(base, settings["annotation"])
        settings["root"] = os.path.join(base, settings.get("root", "") or "")
        settings["repeat_time"] = float(settings.get("repeat_time", 1.0))
        try:
            specs.append(DatasetSpec(name=name, **settings))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return specs


class JsonlFile:
    """Random access to the lines of a JSONL file through their byte offsets (the file is scanned once,
    unless the offsets and line numbers are given, e.g. from the data index; records are parsed when read).
    Blank lines are skipped but keep the numbering of the others."""

    def __init__(self, path: str, offsets: Optional[Sequence[int]] = None, line_numbers: Optional[Sequence[int]] = None):
        self.path = path
        if offsets is not None and line_numbers is not None:
            self._offsets, self._line_numbers = offsets, line_numbers
            return
        self._offsets, self._line_numbers = [], []
        with open(path, "rb") as handle:
            offset = 0
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    self._offsets.append(offset)
                    self._line_numbers.append(number)
                offset += len(raw)

    @property
    def offsets(self) -> Sequence[int]:
        return self._offsets

    @property
    def line_numbers(self) -> Sequence[int]:
        return self._line_numbers

    def __len__(self) -> int:
        return len(self._offsets)

    def line_number(self, index: int) -> int:
        return int(self._line_numbers[index])

    def read(self, index: int) -> dict:
        """The record at ``index``; DataError if the line is not a JSON object."""
        with open(self.path, "rb") as handle:
            handle.seek(int(self._offsets[index]))
            raw = handle.readline()
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"malformed JSON: {error}") from None
        if not isinstance(record, dict):
            raise DataError(f"malformed record: a JSON object is expected, got {type(record).__name__}")
        return record


def record_kind(record: dict) -> str:
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "conversations" in record:
        return "conversation"
    if "text" in record:
        return "text"
    raise DataError("malformed record: no 'conversations', 'text' or 'chosen'/'rejected' field")


def record_reference(record: dict) -> Optional[tuple]:
    """(ref_chosen_logp, ref_rejected_logp) of a preference record when it holds both as finite numbers,
    else None (then a run needs a reference model)."""
    values = [record.get(name) for name in REFERENCE_FIELDS]
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in values):
        return float(values[0]), float(values[1])
    return None


def record_images(record: dict) -> list[str]:
    images = record.get("image", record.get("images"))
    if images is None:
        return []
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and all(isinstance(image, str) for image in images):
        return images
    raise DataError("malformed record: 'image' must be a path or a list of paths")


class RecordDataset:
    """One dataset of a meta file: its records as Samples (or PreferencePairs), in a seeded order per epoch.

    ``augment``: the JPEG augmentation, when the spec's data_augment also asks for it (training); the
    augmentation of a record is seeded from (seed, name, epoch, position), so it is the same after a resume.
    ``index`` (a DatasetIndex of the annotation file): the line offsets come from it (no scan of the file),
    and ``get_shape`` gives an item's shape without reading the record. ``images_decoded`` counts the
    image files (and video frames) this object has decoded. ``video_frames``: the frames sampled per video,
    a FrameSampling or a fixed count (``FrameSampling.fixed``); its draws (count and offsets) are seeded
    from (seed, name, epoch, position) like the augmentation, so the planner's shape and the decoded
    sample agree, and a resume draws the same frames.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        encoder: ConversationEncoder,
        tiler: ImageTiler,
        errors: Optional[DataErrors] = None,
        seed: int = 0,
        augment: bool = True,
        shuffle: bool = True,
        index=None,
        video_frames: Union[int, FrameSampling] = 8,
    ):
        self.spec = spec
        self.name = spec.name
        self.encoder = encoder
        self.tiler = tiler
        self.errors = errors if errors is not None else DataErrors()
        self.seed = seed
        self.augment = augment and spec.data_augment
        self.shuffle = shuffle
        self.index = index
        self.frame_sampling = FrameSampling.of(video_frames)
        self._separator_tokens: dict[int, int] = {}
        self.file = JsonlFile(spec.annotation, index.offsets, index.line_numbers) if index is not None else JsonlFile(spec.annotation)
        self.images_decoded = 0
        self.kind = spec.kind or self._infer_kind()
        self.modality = spec.modality or self._infer_modality()
        self._subsample = self._fractional_subsample()
        self._order_cache: tuple[int, Optional[np.ndarray]] = (-1, None)

    def _first_records(self, count: int = 16) -> Iterator[dict]:
        for index in range(min(count, len(self.file))):
            try:
                yield self.file.read(index)
            except DataError:
                continue

    def _infer_kind(self) -> str:
        for record in self._first_records():
            try:
                return record_kind(record)
            except DataError:
                continue
        return "conversation"

    def _infer_modality(self) -> str:
        if self.kind == "text":
            return "language"
        for record in self._first_records():
            if record.get("image", record.get("images")) or record.get("video"):
                return "multimodal"
        return "language"

    def _record_dtype(self) -> np.dtype:
        return np.dtype(np.int32 if len(self.file) < 2**31 else np.int64)

    def _fractional_subsample(self) -> np.ndarray:
        """The records repeat_time's fractional part adds to every epoch: a seeded sample, increasing."""
        size = len(self.file)
        extra = round((self.spec.repeat_time - int(self.spec.repeat_time)) * size)
        chosen = seeded_generator(self.seed, self.name, "subsample").choice(size, extra, replace=False)
        return np.sort(chosen).astype(self._record_dtype())

    def __len__(self) -> int:
        """Samples per epoch (after repeat_time)."""
        return len(self.file) * int(self.spec.repeat_time) + len(self._subsample)

    @property
    def weight(self) -> float:
        """Mixing weight inside its modality: the spec's, else the epoch size (InternVL's concatenation)."""
        return float(self.spec.weight) if self.spec.weight is not None else float(len(self))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices of an epoch, in order: every record repeat_time's whole part times and the fractional
        subsample, shuffled by numpy's Generator seeded from (seed, name, epoch). A read-only int32 array
        (int64 from 2**31 records): 40 MB at 10M records; the latest epoch's is cached."""
        if self._order_cache[0] != epoch:
            self._order_cache = (-1, None)  # the previous epoch's order goes before this one is built
            records = np.arange(len(self.file), dtype=self._record_dtype())
            whole = int(self.spec.repeat_time)
            order = records if whole == 1 and not len(self._subsample) else np.concatenate([records] * whole + [self._subsample])
            if self.shuffle:
                seeded_generator(self.seed, self.name, "epoch", epoch).shuffle(order)
            order.flags.writeable = False
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def source(self, index: int) -> str:
        return f"{self.file.path}:{self.file.line_number(index)}"

    def _read(self, epoch: int, position: int, read: Callable[[int], Item]) -> Optional[Item]:
        index = int(self.epoch_order(epoch)[position])
        try:
            return read(index)
        except DataError as error:
            self.errors.record(self.file.path, self.file.line_number(index), str(error))
            return None

    def _frames_rng(self, epoch: int, position: int) -> random.Random:
        return seeded_rng(self.seed, self.name, "frames", epoch, position)

    def get(self, epoch: int, position: int) -> Optional[Item]:
        """The item at ``position`` of ``epoch``'s order, or None when the record is bad (then counted)."""
        rng = seeded_rng(self.seed, self.name, "augment", epoch, position) if self.augment else None
        return self._read(epoch, position, lambda index: self.load_record(
            index, rng, self._frames_rng(epoch, position), self.index.video_total(index) if self.index is not None else None))

    def get_shape(self, epoch: int, position: int):
        """The shape (SampleShape, or a PreferencePair of them) of the item ``get`` would return, from the
        index, or None when the index found the record bad (then counted)."""
        if self.index is None:
            raise ValueError(f"dataset {self.name!r} has no index: shapes come from a DatasetIndex")
        return self._read(epoch, position, lambda index: self._indexed_shape(index, epoch, position))

    def _indexed_shape(self, index: int, epoch: int, position: int):
        """The index's shape of record ``index``; a video's grown to the frame count drawn for (epoch, position)."""
        shape = self.index.item_shape(index)
        total = self.index.video_total(index)
        if not total:
            return shape
        frames = self.frame_sampling.count(total, self._frames_rng(epoch, position))
        if isinstance(shape, PreferencePair):
            return PreferencePair(self._with_frames(shape.chosen, frames), self._with_frames(shape.rejected, frames), shape.source)
        return self._with_frames(shape, frames)

    def _with_frames(self, shape: SampleShape, frames: int) -> SampleShape:
        return with_frames(shape, frames, self._separator_length, self.encoder.num_image_token + 2)

    def _separator_length(self, frame: int) -> int:
        if frame not in self._separator_tokens:
            self._separator_tokens[frame] = len(self.encoder.tokenizer.encode(frame_separator(frame)))
        return self._separator_tokens[frame]

    def load_record(self, index: int, augment_rng: Optional[random.Random] = None, frames_rng: Optional[random.Random] = None,
                    video_total: Optional[int] = None) -> Item:
        """The item of record ``index``; DataError when it cannot be built. ``frames_rng``: the draws of a
        video's frames (none: the sampling's least count at the segments' middles). ``video_total``: its
        video's frame total when known (the index's: the planner drew from it too); else its container
        is opened to count them."""
        return self._build(index, augment_rng, frames_rng, measure=False, video_total=video_total)[0]

    def measure_record(self, index: int) -> tuple:
        """(the shape of record ``index``'s item with its video's least frame count at the segments'
        middles, the video's frame total or 0 when it has none), without decoding a pixel: the tokens are
        encoded, each image's tile count comes from its file's header, a video's frame total from its
        container. DataError when the record cannot become an item."""
        return self._build(index, None, None, measure=True)

    def _build(self, index: int, augment_rng: Optional[random.Random], frames_rng: Optional[random.Random], measure: bool,
               video_total: Optional[int] = None) -> tuple:
        """(the item of record ``index``, or its shape when measuring; the video's frame total, or 0)."""
        record = self.file.read(index)
        source = self.source(index)
        kind = record_kind(record)
        paths = record_images(record)
        if record.get("video") is not None:
            if paths or kind == "text":
                raise DataError("malformed record: a video record holds a conversation or a preference, and no images")
            record, images, video_total = self._video(record, measure, frames_rng, video_total)
        else:
            video_total = 0
            tiler = self.tiler.for_images(len(paths))  # several images share the tile budget
            if measure:
                images = {"tiles_per_image": [self._open_image(path, lambda full: tiler.num_tiles(*image_size(full))) for path in paths]}
            else:
                images = {"pixel_values": [self._open_image(path, lambda full: self._decode(full, tiler, augment_rng)) for path in paths]}
        if kind == "text":
            if paths:
                raise DataError("malformed record: a text record has images")
            item = self.encoder.encode_text(record["text"], source)
        elif kind == "conversation":
            item = self.encoder.encode_conversation(record["conversations"], source=source, **images)
        else:
            prompt = record.get("question", record.get("prompt"))
            if prompt is None or "chosen" not in record or "rejected" not in record:
                raise DataError("malformed record: a preference record needs 'question' (or 'prompt'), 'chosen' and 'rejected'")
            item = self.encoder.encode_preference(prompt, record["chosen"], record["rejected"], source=source, **images)
            item.reference = record_reference(record)
        return (item.shape() if measure else item), video_total

    def _video(self, record: dict, measure: bool, frames_rng: Optional[random.Random], total: Optional[int]) -> tuple[dict, dict, int]:
        """The record with its ``<video>`` placeholder (prepended to the first human turn, or the prompt, when
        absent) replaced by one ``FrameN: <image>`` line per sampled frame, the frames (one tile each):
        their count when measuring, their pixels otherwise, and the video's frame total (``total``, when
        known)."""
        video = record["video"]
        if not isinstance(video, str):
            raise DataError("malformed record: 'video' must be a path")
        path = os.path.join(self.spec.root, video)
        total = total or video_frame_count(path)  # 0 or None: not known (an index gives 0 for a bad record)
        indices = self.frame_sampling.indices(total, frames_rng)
        record = copy.deepcopy(record)
        if "conversations" in record:
            turns = record["conversations"]
            texts = [turn for turn in turns if isinstance(turn, dict) and isinstance(turn.get("value"), str)]
            holder = next((turn for turn in texts if VIDEO_PLACEHOLDER in turn["value"]), None)
            if holder is None:
                holder = next((turn for turn in texts if turn.get("from") in ("human", "user")), None)
                if holder is None:
                    raise DataError("malformed record: a video record needs a human turn to hold the video")
            for turn in texts:
                if turn is holder or VIDEO_PLACEHOLDER in turn["value"]:
                    turn["value"] = with_video_prompt(turn["value"], len(indices))
        else:
            key = "question" if "question" in record else "prompt"
            text = record.get(key)
            if not isinstance(text, str):
                raise DataError("malformed record: a preference record needs 'question' (or 'prompt')")
            record[key] = with_video_prompt(text, len(indices))
        if measure:
            return record, {"tiles_per_image": [1] * len(indices)}, total
        frames = load_frames(path, indices)
        self.images_decoded += len(frames)
        return record, {"pixel_values": frame_tiles(frames, self.tiler.tile_size)}, total

    def _decode(self, full_path: str, tiler: ImageTiler, augment_rng: Optional[random.Random]):
        self.images_decoded += 1
        return tiler(load_image(full_path), augment_rng)

    def _open_image(self, path: str, read: Callable[[str], object]):
        """read(full path of ``path``), its failures as DataErrors (missing or corrupt image)."""
        full_path = os.path.join(self.spec.root, path)
        try:
            return read(full_path)
        except FileNotFoundError:
            raise DataError(f"missing image: {full_path}") from None
        except Exception as error:  # PIL raises many types for corrupt files
            raise DataError(f"corrupt image: {full_path} ({type(error).__name__}: {error})") from None

    def iterate(self, epoch: int = 0) -> Iterator[Item]:
        """The valid items of one epoch, in order (bad records counted and skipped)."""
        for position in range(len(self)):
            item = self.get(epoch, position)
            if item is not None:
                yield item
