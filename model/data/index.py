"""The data index: what packing needs to know of every record of an annotation file, measured once and
cached beside the file, so that a run plans its packs without decoding an image.

For each line of the file: its byte offset and line number, then either the shape of the record's sample
(or of a preference pair's two samples: tokens, first supervised position, each image's token span and
tiles), its video's frame total (0 without one) and whether it carries precomputed reference
log-probabilities (MPO), or the reason the record cannot become one
(malformed, missing image, unreadable image header). Measuring tokenizes the record with the run's encoder
and reads each image file's header (its size gives the tile count) or each video's container (its frame
count); no pixel is decoded. A video record is measured with the frame sampling's least count; the
dataset grows the shape to the count it draws (model.data.video.with_frames). A corrupt image whose
header reads is found later, by the rank that decodes it.

Cache: ``<annotation>.index-<fingerprint>.npz``, the fingerprint covering the file (path, size,
modification time), the tokenizer, the encoder's and the tiler's settings, the image root and the least frames per video:
changing any of them builds a new index, beside the others: jobs with different settings share the folder
without rebuilding each other's. An index's modification time is its last use (touched on each load); after
a build, the indexes of the same file beyond its KEEP_INDEXES most recently used are deleted once unused for
UNUSED_FOR_S (a job maps its index from its start to its end). Written atomically: a temporary file in the
same folder, renamed. When the annotation's folder is not writable the index goes to
``$INTERNVL3_INDEX_CACHE`` (default ``~/.cache/internvl3-engine/index``). Under torch.distributed the
ranks measure interleaved shares of the records, gather them, and rank 0 writes the file. A cached index
is memory-mapped: the ranks of a node share its pages, and each holds in memory only what it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from dataclasses import asdict
from typing import Callable, Optional, Union

import numpy as np
import torch.distributed as dist

from .conversation import ConversationEncoder, DataError, PreferencePair, SampleShape
from .datasets import DatasetSpec, JsonlFile, RecordDataset
from .tiling import ImageTiler
from .video import FrameSampling

FORMAT = 3
KIND_CODES = {"sample": 0, "pair": 1}
BAD = -1

KEEP_INDEXES = 4
"""The indexes of one annotation file (other settings', or of earlier versions of the file) kept in its cache
folder whatever their age: the most recently used."""

UNUSED_FOR_S = 7 * 24 * 3600
"""How long an index beyond the KEEP_INDEXES most recently used must have gone unused before a build deletes
it. A job touches its index only when it loads it, at its start, and keeps it mapped to its end: deleting a
file another node maps on NFS can kill that job, so the age is far beyond a run's length."""


def _fingerprint(spec: DatasetSpec, encoder: ConversationEncoder, tiler: ImageTiler, frames: FrameSampling) -> str:
    status = os.stat(spec.annotation)
    settings = {
        "format": FORMAT,
        "annotation": os.path.realpath(spec.annotation),
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "root": os.path.realpath(spec.root),
        "tokenizer": encoder.tokenizer.fingerprint(),
        "num_image_token": encoder.num_image_token,
        "system_message": encoder.system_message,
        "tiler": asdict(tiler),
        "video_min_frames": frames.min_frames,  # the count measured; the rest of the sampling is drawn later
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(spec: DatasetSpec, fingerprint: str) -> str:
    """Where the index of ``spec``'s annotation file with this fingerprint lives (beside the file when its
    folder is writable)."""
    folder, name = os.path.split(os.path.abspath(spec.annotation))
    filename = f"{name}.index-{fingerprint}.npz"
    if os.access(folder, os.W_OK):
        return os.path.join(folder, filename)
    cache = os.environ.get("INTERNVL3_INDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "internvl3-engine", "index"))
    return os.path.join(cache, filename)


class DatasetIndex:
    """The measured records of one annotation file (see the module docstring); ``item_shape(i)`` is record
    i's SampleShape (or PreferencePair of shapes), or a DataError with the reason it is bad."""

    def __init__(self, path: str, arrays: dict, fingerprint: str):
        self.path = path  # the annotation file
        self.fingerprint = fingerprint
        # Plain ndarray views of memory-mapped arrays (the same pages): np.memmap's indexing costs several
        # times a plain array's, and planning reads the index a few times per sample.
        arrays = {name: array.view(np.ndarray) if isinstance(array, np.memmap) else array for name, array in arrays.items()}
        self.offsets = arrays["offsets"]
        self.line_numbers = arrays["line_numbers"]
        self.kinds = arrays["kinds"]  # KIND_CODES, or BAD
        self.record_samples = arrays["record_samples"]  # [N + 1]: the records' first sample
        self.sample_length = arrays["sample_length"]
        self.sample_first_target = arrays["sample_first_target"]
        self.sample_images = arrays["sample_images"]  # [S + 1]: the samples' first image
        self.image_span = arrays["image_span"]  # [I, 2]
        self.image_tiles = arrays["image_tiles"]
        self.video_frame_totals = arrays["video_frame_totals"]  # [N]: each record's video frame total, 0 without a video
        self.has_reference = arrays["has_reference"]  # [N]: 1 for a preference record carrying reference log-probs
        self.reasons = {int(row): reason for row, reason in json.loads(str(arrays["reasons"])).items()}

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def content_digest(self) -> int:
        """A signed 64-bit digest of the measured shapes (what planning reads): equal on ranks whose copies of
        the annotation file give the same packs, so the ranks can compare it (one all-reduce)."""
        digest = hashlib.blake2b(digest_size=8)
        for array in (self.kinds, self.record_samples, self.sample_length, self.sample_first_target, self.sample_images,
                      self.image_span, self.image_tiles, self.video_frame_totals):
            digest.update(np.ascontiguousarray(array).tobytes())
        return int.from_bytes(digest.digest(), "little", signed=True)

    @property
    def bad_records(self) -> int:
        return len(self.reasons)

    def _sample(self, sample: int, source: str) -> SampleShape:
        first, last = self.sample_images[sample : sample + 2].tolist()  # tolist: Python ints, read at C speed
        spans = [tuple(span) for span in self.image_span[first:last].tolist()]
        return SampleShape(int(self.sample_length[sample]), int(self.sample_first_target[sample]), spans,
                           self.image_tiles[first:last].tolist(), source)

    def preference_pairs(self) -> tuple[int, int]:
        """(the preference records, how many of them carry precomputed reference log-probabilities)."""
        pairs = self.kinds == KIND_CODES["pair"]
        return int(pairs.sum()), int((self.has_reference[pairs] != 0).sum())

    def video_total(self, record: int) -> int:
        """The frame total of record ``record``'s video (0: it has none)."""
        return int(self.video_frame_totals[record])

    def item_shape(self, record: int):
        if int(self.kinds[record]) == BAD:
            raise DataError(self.reasons[record])
        source = f"{self.path}:{int(self.line_numbers[record])}"
        first = int(self.record_samples[record])
        if int(self.kinds[record]) == KIND_CODES["pair"]:
            return PreferencePair(self._sample(first, source), self._sample(first + 1, source), source)
        return self._sample(first, source)

    def save(self, target: str) -> None:
        """Written atomically (a temporary file renamed); then the indexes of the same annotation file that
        the cache no longer keeps are deleted (prune_indexes)."""
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        arrays = {name: getattr(self, name) for name in ("offsets", "line_numbers", "kinds", "record_samples", "sample_length",
                                                          "sample_first_target", "sample_images", "image_span", "image_tiles",
                                                          "video_frame_totals", "has_reference")}
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, reasons=np.array(json.dumps({str(k): v for k, v in self.reasons.items()})),
                     fingerprint=np.array(self.fingerprint), **arrays)
        os.replace(temporary, target)
        prune_indexes(target)

    @classmethod
    def load(cls, path: str, annotation: str, fingerprint: str) -> Optional["DatasetIndex"]:
        """The cached index at ``path``, or None when absent or not of this fingerprint. Its arrays are
        memory-mapped read-only (``_mapped_arrays``): the ranks of a node share one copy in the page cache,
        and a rank's memory holds only the pages it reads."""
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path) as stored:
                if str(stored["fingerprint"]) != fingerprint:
                    return None
                arrays = _mapped_arrays(path, stored)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # unreadable or from another format: rebuilt
        try:
            os.utime(path)  # used now: kept by prune_indexes
        except OSError:
            pass  # another user's cache: usable, its age is that of its owner's last use
        return cls(annotation, arrays, fingerprint)


def prune_indexes(target: str) -> None:
    """Deletes the indexes in ``target``'s folder of the same annotation file as ``target`` that are beyond
    the KEEP_INDEXES most recently used and unused for UNUSED_FOR_S; ``target`` stays."""
    folder, name = os.path.split(target)
    prefix = name.split(".index-")[0] + ".index-"
    used = []
    for other in os.listdir(folder):
        if other.startswith(prefix) and other.endswith(".npz") and other != name:
            try:
                used.append((os.stat(os.path.join(folder, other)).st_mtime, other))
            except FileNotFoundError:
                continue  # deleted by another job meanwhile
    now = time.time()
    for mtime, other in sorted(used, reverse=True)[KEEP_INDEXES - 1:]:
        if now - mtime > UNUSED_FOR_S:
            try:
                os.remove(os.path.join(folder, other))
            except FileNotFoundError:
                pass


def _mapped_arrays(path: str, stored) -> dict:
    """The arrays of the .npz file at ``path`` (``stored``: it opened by np.load): each array of rank >= 1
    stored uncompressed (as np.savez stores them) as a read-only np.memmap of its bytes inside the file,
    anything else read into memory."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for member in archive.infolist():
            name = member.filename[: -len(".npy")]
            if member.compress_type != zipfile.ZIP_STORED:
                arrays[name] = stored[name]
                continue
            raw.seek(member.header_offset)
            local = raw.read(30)  # the local file header; its name and extra field lengths end it
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: a corrupt zip member {member.filename}")
            name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            raw.seek(member.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                arrays[name] = stored[name]
                continue
            shape, fortran_order, dtype = readers[version](raw)
            if len(shape) == 0 or dtype.hasobject or 0 in shape:
                arrays[name] = stored[name]
                continue
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order="F" if fortran_order else "C")
    return arrays


def _measure(dataset: RecordDataset, records) -> list:
    """(record, shape or the reason it is bad, video frame total) for ``records`` of ``dataset``."""
    measured = []
    for record in records:
        try:
            measured.append((record, *dataset.measure_record(record)))
        except DataError as error:
            measured.append((record, str(error), 0))
    return measured


def _assemble(annotation: str, file: JsonlFile, measured: list, fingerprint: str) -> DatasetIndex:
    measured = sorted(measured, key=lambda entry: entry[0])
    kinds, record_samples, reasons, video_frame_totals, has_reference = [], [0], {}, [], []
    lengths, first_targets, sample_images, spans, tiles = [], [], [0], [], []
    for record, shape, video_total in measured:
        video_frame_totals.append(video_total)
        has_reference.append(int(isinstance(shape, PreferencePair) and shape.reference is not None))
        if isinstance(shape, str):
            kinds.append(BAD)
            reasons[record] = shape
            samples = []
        elif isinstance(shape, PreferencePair):
            kinds.append(KIND_CODES["pair"])
            samples = [shape.chosen, shape.rejected]
        else:
            kinds.append(KIND_CODES["sample"])
            samples = [shape]
        for sample in samples:
            lengths.append(sample.length)
            first_targets.append(sample.first_target)
            spans.extend(sample.spans)
            tiles.extend(sample.tiles_per_image)
            sample_images.append(len(tiles))
        record_samples.append(len(lengths))
    arrays = {
        "offsets": np.asarray(file.offsets, dtype=np.int64),
        "line_numbers": np.asarray(file.line_numbers, dtype=np.int64),
        "kinds": np.asarray(kinds, dtype=np.int8),
        "record_samples": np.asarray(record_samples, dtype=np.int64),
        "sample_length": np.asarray(lengths, dtype=np.int64),
        "sample_first_target": np.asarray(first_targets, dtype=np.int64),
        "sample_images": np.asarray(sample_images, dtype=np.int64),
        "image_span": np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        "image_tiles": np.asarray(tiles, dtype=np.int64),
        "video_frame_totals": np.asarray(video_frame_totals, dtype=np.int64),
        "has_reference": np.asarray(has_reference, dtype=np.int8),
        "reasons": np.array(json.dumps({str(k): v for k, v in reasons.items()})),
    }
    return DatasetIndex(annotation, arrays, fingerprint)


def load_or_build_index(
    spec: DatasetSpec, encoder: ConversationEncoder, tiler: ImageTiler, progress: Optional[Callable] = None,
    video_frames: Union[int, FrameSampling] = 8,
) -> DatasetIndex:
    """The index of ``spec``'s annotation file: from the cache when it matches, else measured (split over
    the ranks under torch.distributed; call it on every rank) and cached. ``progress(iterable, total,
    description)`` wraps the measuring loop (e.g. a tqdm bar); None: silent. ``video_frames``: the frame
    sampling of videos (the RecordDataset's)."""
    fingerprint = _fingerprint(spec, encoder, tiler, FrameSampling.of(video_frames))
    path = cache_path(spec, fingerprint)
    index = DatasetIndex.load(path, spec.annotation, fingerprint)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # every rank takes the cached index, or all of them build it together
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, index is not None)
        if not all(found):
            index = None
    if index is not None:
        return index
    dataset = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False, video_frames=video_frames)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    records = range(rank, len(dataset.file), world)
    if progress is not None:
        records = progress(records, len(records), f"indexing {spec.name}")
    measured = _measure(dataset, records)
    if distributed:
        shares = [None] * world
        dist.all_gather_object(shares, measured)
        measured = [entry for share in shares for entry in share]
    index = _assemble(spec.annotation, dataset.file, measured, fingerprint)
    if rank == 0:
        index.save(path)
    if distributed:
        dist.barrier()
    # The saved file, mapped (see DatasetIndex.load), where this rank sees it; else the arrays in memory.
    saved = DatasetIndex.load(path, spec.annotation, fingerprint)
    return saved if saved is not None else index
