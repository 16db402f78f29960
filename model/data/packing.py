"""Packing samples into batches bounded by a token budget and a tile budget.

Label shift (the one place it happens): a Sample's labels are aligned with its input_ids; a PackedBatch's
``labels[t]`` is the target of position t, i.e. the sample's input_ids[t+1] where that token is supervised,
and -100 at each sample's last token. The model computes cross-entropy of logits[t] against labels[t]
with no further shift.

Policy (InternVL's open-buffer greedy packing, with best fit): up to ``max_buffers`` buffers stay open; a
sample goes into the fullest open buffer that can take it under both budgets; a buffer that reaches a
budget exactly is emitted at once; when no buffer can take the sample and all are open, the fullest is
emitted and the sample opens a new one. A sample (or an MPO pair, which always stays in one pack, chosen
then rejected) over a budget is truncated (default; the cut never splits an image, a pair's members get
half the budgets each) or dropped, with a warning; a sample left with no target is dropped. A budget that
fits none of the data is an error, not an endless search for a sample to pack: before training
(check_budget_fits, from the data index) and, failing that, once DROPPED_IN_A_ROW items were dropped in a row.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch

from internvl3_engine import loss_weights, pack_lengths, v2pe_position_ids

from .conversation import IGNORE_INDEX, PreferencePair, Sample
from .datasets import Item, seeded_rng

DELTA_CHOICES = tuple(1.0 / 2**k for k in range(9))  # V2PE's training deltas 1, 1/2, ..., 1/256
OVERLONG_POLICIES = ("truncate", "drop")
LOSS_MODES = ("square", "token", "sample")

DROPPED_IN_A_ROW = 1000
"""Items Packer.add may drop in a row before it raises: a budget that fits no sample would have the planner
draw samples forever. A budget dropping 9 samples in 10 gives a run of 1,000 with odds of about 1e-46."""


@dataclass(frozen=True)
class PackingConfig:
    """``delta`` None draws each image's V2PE delta from ``delta_choices`` (training, seeded); a float fixes
    it (evaluation). ``blank_tile_size``: a pack without images gets one zero tile of that size with
    image_flag 0, so every data-parallel rank runs the vision tower (InternVL's rule); None: no tile."""

    max_packed_tokens: int = 8192
    max_tiles: int = 40
    max_buffers: int = 20
    overlong: str = "truncate"
    loss_mode: str = "square"
    delta: Optional[float] = None
    delta_choices: tuple = DELTA_CHOICES
    blank_tile_size: Optional[int] = None

    def __post_init__(self):
        if self.max_packed_tokens < 2:
            raise ValueError(f"max_packed_tokens must be at least 2, got {self.max_packed_tokens}")
        if self.max_tiles < 0 or self.max_buffers < 1:
            raise ValueError(f"need max_tiles >= 0 and max_buffers >= 1, got {self.max_tiles}, {self.max_buffers}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        for delta in (self.delta,) if self.delta is not None else self.delta_choices:
            if not 0 < delta <= 1:
                raise ValueError(f"V2PE deltas must lie in (0, 1], got {delta}")


@dataclass
class PackedBatch:
    """One pack of B samples and T tokens.

    input_ids int64 [T]; labels int64 [T] (shifted: the target of each position, -100 where none);
    cu_seqlens int32 [B+1]; max_seqlen host int; is_visual bool [T] (the <IMG_CONTEXT> tokens);
    positions float32 [T] (V2PE, restarting at 0 per sample); loss_weights float32 [T];
    pixel_values float32 [tiles, 3, H, W] or None; image_flags int64 [tiles] (0 for a blank tile);
    tiles_per_image (host ints, images in order); deltas (host floats, one per image);
    sources ('file:line' per sample); roles ('sample', or 'chosen'/'rejected' for MPO pairs); references
    (per MPO pair, in order: its precomputed reference log-probabilities (chosen, rejected), or None);
    batch_index (its rank among a Packer's batches) and keys (its items' stream keys), for resuming.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    is_visual: torch.Tensor
    positions: torch.Tensor
    loss_weights: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    image_flags: torch.Tensor
    tiles_per_image: list = field(default_factory=list)
    deltas: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    roles: list = field(default_factory=list)
    references: list = field(default_factory=list)
    batch_index: int = -1
    keys: list = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)

    def _map_tensors(self, function) -> "PackedBatch":
        values = {}
        for entry in fields(self):
            value = getattr(self, entry.name)
            values[entry.name] = function(value) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**values)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """A copy in page-locked host memory (the DataLoader's pin_memory thread calls it)."""
        return self._map_tensors(lambda tensor: tensor.pin_memory())


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets of one sample: labels[1:] followed by -100."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def _samples_of(item: Item) -> list[tuple[Sample, str]]:
    if isinstance(item, PreferencePair):
        return [(item.chosen, "chosen"), (item.rejected, "rejected")]
    return [(item, "sample")]


def collate(items: Sequence[Item], config: PackingConfig, rng: Optional[random.Random] = None) -> PackedBatch:
    """The PackedBatch of ``items`` in order (MPO pairs contribute chosen then rejected). ``rng`` draws the
    V2PE deltas when ``config.delta`` is None."""
    samples = [entry for item in items for entry in _samples_of(item)]
    if not samples:
        raise ValueError("cannot collate an empty pack")
    lengths = [len(sample) for sample, _ in samples]
    packed = pack_lengths(lengths)
    input_ids = torch.cat([sample.input_ids for sample, _ in samples])
    labels = torch.cat([shift_labels(sample.labels) for sample, _ in samples])
    is_visual = torch.cat([sample.is_visual for sample, _ in samples])
    tiles_per_image = [tiles for sample, _ in samples for tiles in sample.tiles_per_image]

    if config.delta is not None:
        deltas = [float(config.delta)] * len(tiles_per_image)
    else:
        if rng is None:
            raise ValueError("an rng is needed to draw V2PE deltas (config.delta is None)")
        deltas = [rng.choice(config.delta_choices) for _ in tiles_per_image]
    positions = v2pe_position_ids(is_visual, packed.cu_seqlens, torch.tensor(deltas, dtype=torch.float32))
    weights = loss_weights(labels, packed.cu_seqlens, mode=config.loss_mode)

    pixels = [sample.pixel_values for sample, _ in samples if sample.pixel_values is not None]
    if pixels:
        pixel_values = torch.cat(pixels)
        image_flags = torch.ones(pixel_values.shape[0], dtype=torch.int64)
    elif config.blank_tile_size is not None:
        size = config.blank_tile_size
        pixel_values = torch.zeros(1, 3, size, size, dtype=torch.float32)
        image_flags = torch.zeros(1, dtype=torch.int64)
    else:
        pixel_values = None
        image_flags = torch.zeros(0, dtype=torch.int64)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        cu_seqlens=packed.cu_seqlens,
        max_seqlen=packed.max_seqlen,
        is_visual=is_visual,
        positions=positions,
        loss_weights=weights,
        pixel_values=pixel_values,
        image_flags=image_flags,
        tiles_per_image=tiles_per_image,
        deltas=deltas,
        sources=[sample.source for sample, _ in samples],
        roles=[role for _, role in samples],
        references=[item.reference for item in items if isinstance(item, PreferencePair)],
    )


@dataclass
class PackPlan:
    """A pack before collation: the ``batch_index``-th of its Packer, its items' stream keys and the items,
    fitted to the budgets. The items may be shapes (SampleShape, pairs of them): a plan made from the data
    index says which records a pack holds and how big it is before any of them is decoded."""

    batch_index: int
    keys: list
    items: list

    def sample_lengths(self) -> list[int]:
        return [len(sample) for item in self.items for sample, _ in _samples_of(item)]

    @property
    def num_tokens(self) -> int:
        return sum(len(item) for item in self.items)

    @property
    def num_tiles(self) -> int:
        return sum(item.num_tiles for item in self.items)


@dataclass(eq=False)  # buffers are compared by identity (list.remove)
class _Buffer:
    entries: list = field(default_factory=list)  # (key, item)
    tokens: int = 0
    tiles: int = 0

    def add(self, key: Any, item: Item) -> None:
        self.entries.append((key, item))
        self.tokens += len(item)
        self.tiles += item.num_tiles


class Packer:
    """Greedy open-buffer packing (see the module docstring). ``add`` returns the plans of the packs it
    completes, ``flush`` the rest; ``collate`` makes a plan of samples a PackedBatch. Items may carry a ``key`` (any value, e.g. the data stream's position):
    ``buffered_keys`` lists the keys of the items in open buffers, so a checkpoint can record them and
    ``restore`` can put the re-read items back. The V2PE deltas of the n-th emitted batch are drawn from
    (seed, n): resuming reproduces them."""

    def __init__(self, config: PackingConfig = PackingConfig(), seed: int = 0):
        self.config = config
        self.seed = seed
        self.buffers: list[_Buffer] = []
        self.batches_emitted = 0
        self.truncated = 0
        self.dropped = 0
        self._drops_in_a_row = 0
        self._smallest_dropped: Optional[tuple] = None  # (tokens, tiles, source) of the items dropped in a row

    def _fit_budget(self, item: Item, report: bool = True) -> Optional[Item]:
        """The item within budgets (truncated or None per the policy); ``report`` counts and warns."""
        config = self.config
        if len(item) <= config.max_packed_tokens and item.num_tiles <= config.max_tiles:
            return item
        source = item.source
        if not report:
            return self._truncate(item)
        if config.overlong == "drop":
            self.dropped += 1
            warnings.warn(
                f"{source}: dropped a sample of {len(item)} tokens / {item.num_tiles} tiles over the budget "
                f"({config.max_packed_tokens} tokens / {config.max_tiles} tiles)",
                stacklevel=3,
            )
            return None
        self.truncated += 1
        warnings.warn(
            f"{source}: truncated a sample of {len(item)} tokens / {item.num_tiles} tiles to the budget "
            f"({config.max_packed_tokens} tokens / {config.max_tiles} tiles)",
            stacklevel=3,
        )
        truncated = self._truncate(item)
        if truncated is None:
            self.dropped += 1
            warnings.warn(f"{source}: dropped a sample left with no target after truncation", stacklevel=3)
        return truncated

    def _truncate(self, item: Item) -> Optional[Item]:
        config = self.config
        if isinstance(item, PreferencePair):
            tokens, tiles = config.max_packed_tokens // 2, config.max_tiles // 2
            pair = PreferencePair(item.chosen.truncated(tokens, tiles), item.rejected.truncated(tokens, tiles), item.source)
            return pair if pair.chosen.has_target() and pair.rejected.has_target() else None
        sample = item.truncated(config.max_packed_tokens, config.max_tiles)
        return sample if sample.has_target() else None

    def refit(self, item: Item) -> Item:
        """A re-read item fitted to the budgets as it was when first added (no warning, no count)."""
        return self._fit_budget(item, report=False)

    def _emit(self, buffer: _Buffer) -> PackPlan:
        self.buffers.remove(buffer)
        self.batches_emitted += 1
        return PackPlan(self.batches_emitted - 1, [key for key, _ in buffer.entries], [item for _, item in buffer.entries])

    def collate(self, plan: PackPlan) -> PackedBatch:
        """The PackedBatch of a plan whose items are samples (its V2PE deltas drawn from (seed, batch_index),
        so a plan collated again, on any rank, gives the same batch)."""
        rng = seeded_rng(self.seed, "v2pe", plan.batch_index) if self.config.delta is None else None
        batch = collate(plan.items, self.config, rng)
        batch.batch_index = plan.batch_index
        batch.keys = list(plan.keys)
        return batch

    def _count_drop(self, item: Item) -> None:
        """One more item dropped in a row; DROPPED_IN_A_ROW of them is a ValueError naming the budget and
        the smallest of them."""
        size = (len(item), item.num_tiles, item.source)
        self._smallest_dropped = size if self._smallest_dropped is None else min(self._smallest_dropped, size)
        self._drops_in_a_row += 1
        if self._drops_in_a_row >= DROPPED_IN_A_ROW:
            tokens, tiles, source = self._smallest_dropped
            raise ValueError(f"{self._drops_in_a_row} samples in a row dropped: none fits {_budget(self.config)}; "
                             f"the smallest of them, {source}, has {tokens} tokens / {tiles} tiles")

    def add(self, item: Item, key: Any = None) -> list[PackPlan]:
        fitted = self._fit_budget(item)
        if fitted is None:
            self._count_drop(item)
            return []
        item, self._drops_in_a_row, self._smallest_dropped = fitted, 0, None
        config = self.config
        fitting = [
            buffer
            for buffer in self.buffers
            if buffer.tokens + len(item) <= config.max_packed_tokens and buffer.tiles + item.num_tiles <= config.max_tiles
        ]
        emitted = []
        if fitting:
            target = max(fitting, key=lambda buffer: (buffer.tokens, buffer.tiles))
        else:
            if len(self.buffers) >= config.max_buffers:
                emitted.append(self._emit(max(self.buffers, key=lambda buffer: (buffer.tokens, buffer.tiles))))
            target = _Buffer()
            self.buffers.append(target)
        target.add(key, item)
        if target.tokens == config.max_packed_tokens or (config.max_tiles and target.tiles == config.max_tiles):
            emitted.append(self._emit(target))
        return emitted

    def flush(self) -> list[PackPlan]:
        """Every open buffer as a batch, fullest first."""
        ordered = sorted(self.buffers, key=lambda buffer: (buffer.tokens, buffer.tiles), reverse=True)
        return [self._emit(buffer) for buffer in ordered]

    def buffered_keys(self) -> list[list]:
        return [[key for key, _ in buffer.entries] for buffer in self.buffers]

    def state_dict(self) -> dict:
        return {"buffered_keys": self.buffered_keys(), "batches_emitted": self.batches_emitted, "truncated": self.truncated, "dropped": self.dropped}

    def restore(self, state: dict, items_by_buffer: Sequence[Sequence[tuple[Any, Item]]]) -> None:
        """Back to ``state`` (from state_dict), with the open buffers' (key, item) re-read by the caller
        from ``state['buffered_keys']`` (fitted to the budgets again, silently: they were reported when first added)."""
        self.batches_emitted = int(state["batches_emitted"])
        self.truncated = int(state["truncated"])
        self.dropped = int(state["dropped"])
        self.buffers = []
        for entries in items_by_buffer:
            buffer = _Buffer()
            for key, item in entries:
                buffer.add(key, self.refit(item))
            self.buffers.append(buffer)


def _budget(config: PackingConfig) -> str:
    return f"the pack budget (data.max_packed_tokens {config.max_packed_tokens}, data.max_tiles {config.max_tiles})"


_CHECKED_AT_ONCE = 1 << 20
"""Samples check_budget_fits measures at once: its memory stays about 50 MB whatever the data's size, and a
budget most samples fit is found fitting after the first of them."""


def _least_needs(index, overlong: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, tiles) each sample start..stop-1 of ``index`` (a DatasetIndex) needs to stay in a pack: its
    size under overlong 'drop'; under 'truncate' the prefix through its first target with the images in it
    (its size without a target: it is kept only whole)."""
    lengths, first_target = index.sample_length[start:stop], index.sample_first_target[start:stop]
    images = index.sample_images[start : stop + 1]
    owner = np.repeat(np.arange(stop - start), np.diff(images))  # each image's sample, from start
    image_tiles = index.image_tiles[images[0] : images[-1]]
    tiles = np.bincount(owner, weights=image_tiles, minlength=stop - start).astype(np.int64)
    if overlong == "drop":
        return lengths, tiles
    before_target = index.image_span[images[0] : images[-1], 0] < first_target[owner]
    tiles_before = np.bincount(owner, weights=np.where(before_target, image_tiles, 0), minlength=stop - start).astype(np.int64)
    has_target = first_target > 0
    return np.where(has_target, first_target + 1, lengths), np.where(has_target, tiles_before, tiles)


def check_budget_fits(config: PackingConfig, indexes: Sequence) -> None:
    """A ValueError when no sample of ``indexes`` (DatasetIndexes: the shapes of the records a run draws
    from) fits ``config``'s budget as Packer.add fits it, naming the budget setting and the sample that
    needs the least: the Packer would drop every sample and never complete a pack. A sample needs its size
    under overlong 'drop', its prefix through its first target under 'truncate'. An MPO pair needs at least
    what each of its samples does and the index measures a video at its fewest frames, so a budget that
    passes can still drop all that is drawn: Packer.add's DROPPED_IN_A_ROW ends that."""
    smallest = None  # (tokens, tiles, source) of the sample needing the fewest tokens
    for index in indexes:
        for start in range(0, len(index.sample_length), _CHECKED_AT_ONCE):
            tokens, tiles = _least_needs(index, config.overlong, start, min(start + _CHECKED_AT_ONCE, len(index.sample_length)))
            if np.any((tokens <= config.max_packed_tokens) & (tiles <= config.max_tiles)):
                return
            sample = int(np.argmin(tokens))
            record = int(np.searchsorted(index.record_samples, start + sample, side="right")) - 1
            need = (int(tokens[sample]), int(tiles[sample]), f"{index.path}:{int(index.line_numbers[record])}")
            smallest = need if smallest is None else min(smallest, need)
    if smallest is None:
        return
    tokens, tiles, source = smallest
    over = [f"{name} {budget}" for name, need, budget in (("data.max_packed_tokens", tokens, config.max_packed_tokens),
                                                          ("data.max_tiles", tiles, config.max_tiles)) if need > budget]
    raise ValueError(f"no sample fits {_budget(config)}: the smallest, {source}, needs {tokens} tokens / {tiles} tiles to stay "
                     f"in a pack (data.overlong {config.overlong}), over {' and '.join(over)}")
