"""A deterministic, resumable stream mixing language-only and multimodal datasets by token weight.

Mixing rule (deterministic, weighted round robin on tokens): the next item comes from the modality whose
tokens so far divided by its weight is smallest (default weights language 1, multimodal 3, InternVL3's
1:3 in tokens), and inside it from the dataset whose tokens so far divided by its weight is smallest
(the meta's "weight", else its epoch size). Each dataset walks its own seeded epoch orders; its cursor is
(epoch, position). Randomness lives in those per-epoch shuffles and in counter-seeded draws (augmentation,
V2PE deltas), so the whole state is a small JSON-able dict of cursors and token counters. Restoring it
continues the identical sequence and reads no consumed record again. With ``shapes=True`` the stream
gives the items' shapes from the datasets' indexes (planning) instead of decoded items.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from .datasets import MODALITIES, DataErrors, Item, RecordDataset


class MixedStream:
    """An endless stream of (key, item) from ``datasets``; key = (dataset name, epoch, position). Bad records
are counted in ``errors`` (the caller's to save: the stream's state holds its position only)."""

    def __init__(
        self,
        datasets: Sequence[RecordDataset],
        language_weight: float = 1.0,
        multimodal_weight: float = 3.0,
        errors: Optional[DataErrors] = None,
        shapes: bool = False,
    ):
        if not datasets:
            raise ValueError("a mixed stream needs at least one dataset")
        names = [dataset.name for dataset in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        if not (language_weight >= 0 and multimodal_weight >= 0):
            raise ValueError(f"modality weights must be >= 0, got {language_weight}, {multimodal_weight}")
        self.datasets = {dataset.name: dataset for dataset in datasets}
        self.shapes = shapes
        self.errors = errors if errors is not None else datasets[0].errors
        for dataset in datasets:
            dataset.errors = self.errors
        modality_weight = {"language": language_weight, "multimodal": multimodal_weight}
        self.groups = {
            modality: [d.name for d in datasets if d.modality == modality and d.weight > 0 and len(d) > 0]
            for modality in MODALITIES
            if modality_weight[modality] > 0
        }
        self.groups = {modality: members for modality, members in self.groups.items() if members}
        if not self.groups:
            raise ValueError("no dataset has a positive weight and at least one record")
        self.modality_weight = modality_weight
        self.cursors = {name: [0, 0] for name in self.datasets}
        self.dataset_tokens = {name: 0 for name in self.datasets}
        self.modality_tokens = {modality: 0 for modality in MODALITIES}
        self.items = 0

    def _choose(self) -> str:
        modality = min(self.groups, key=lambda m: self.modality_tokens[m] / self.modality_weight[m])
        members = self.groups[modality]
        return min(members, key=lambda name: self.dataset_tokens[name] / self.datasets[name].weight)

    def _advance(self, name: str) -> tuple:
        epoch, position = self.cursors[name]
        key = (name, epoch, position)
        position += 1
        if position >= len(self.datasets[name]):
            epoch, position = epoch + 1, 0
        self.cursors[name] = [epoch, position]
        return key

    def _read(self, name: str, epoch: int, position: int):
        dataset = self.datasets[name]
        return dataset.get_shape(epoch, position) if self.shapes else dataset.get(epoch, position)

    def next(self) -> tuple[tuple, Item]:
        name = self._choose()
        dataset = self.datasets[name]
        for _ in range(len(dataset)):
            key = self._advance(name)
            item = self._read(*key)
            if item is not None:
                self.dataset_tokens[name] += len(item)
                self.modality_tokens[dataset.modality] += len(item)
                self.items += 1
                return key, item
        raise ValueError(f"dataset {name!r}: {len(dataset)} bad records in a row (every record of an epoch), see:\n{self.errors.summary()}")

    def __iter__(self) -> Iterator[tuple[tuple, Item]]:
        while True:
            yield self.next()

    def fetch(self, key) -> Item:
        """The item (or shape) at ``key`` again (for items a checkpoint saw in the packer's buffers)."""
        name, epoch, position = key
        item = self._read(name, int(epoch), int(position))
        if item is None:
            raise RuntimeError(f"dataset {name!r}: the record at epoch {epoch}, position {position} could not be re-read")
        return item

    def token_fractions(self) -> dict[str, float]:
        total = sum(self.modality_tokens.values())
        return {m: (tokens / total if total else 0.0) for m, tokens in self.modality_tokens.items()}

    def state_dict(self) -> dict:
        return {
            "cursors": {name: list(cursor) for name, cursor in self.cursors.items()},
            "dataset_tokens": dict(self.dataset_tokens),
            "modality_tokens": dict(self.modality_tokens),
            "items": self.items,
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["cursors"]) != set(self.datasets):
            raise ValueError(f"the saved stream has datasets {sorted(state['cursors'])}, this one {sorted(self.datasets)}")
        self.cursors = {name: [int(epoch), int(position)] for name, (epoch, position) in state["cursors"].items()}
        self.dataset_tokens = {name: int(tokens) for name, tokens in state["dataset_tokens"].items()}
        self.modality_tokens = {m: int(tokens) for m, tokens in state["modality_tokens"].items()}
        self.items = int(state["items"])
