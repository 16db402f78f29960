"""Per-rank data loading: every rank plans the same packs from the data index and decodes only its own.

StepPlanner (the loader's sampler, in each rank's main process): the MixedStream walks the datasets'
shapes (from the data index: nothing is decoded), the Packer packs them into PackPlans, and each optimizer
step's dp_world x packs_per_rank plans are shared out by the vision-aware balancer on their cost; it yields
the rank's StepShare. With ``ahead`` it plans in a thread of its own, that many steps ahead of the loader,
so planning every rank's packs overlaps the training step instead of running between two. Its state
(stream cursors, the packer's open buffers and the plans not yet shared out, as stream keys) is the same on
every rank and at every world size, and so are its per-dataset digests of every pack planned so far, which
the ranks compare to find a file that differs between them.

PackDecoder (the loader's dataset, in the worker processes): a StepShare's records are read, decoded,
tiled and tokenized, fitted to the budgets as planned and collated into StepData; the ranks sharing a
share's packs (tensor- and context-parallel peers) each decode every peers-th pack of it, starting from a
peer that rotates with the step (decoding_peer), so with one pack a step they decode in turn. A record that fails
here (a corrupt image whose header read, a file changed since it was indexed) leaves its pack and is
reported with the step; a pack left with no record becomes a one-token pack with no target, so the rank
still takes part in the step's collectives.

build_loader: torchdata's StatefulDataLoader over the two (worker processes, prefetch, pinned memory on
GPU) with a snapshot every step: its state_dict is the position after the last step taken from it, and a
resume reads no record again but the open buffers' shapes (from the index).
"""

from __future__ import annotations

import copy
import queue
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional

import torch
from internvl3_engine.parallel import balance, naive_split

from .datasets import DataErrors, RecordDataset
from .mixing import MixedStream
from .packing import PackedBatch, Packer, PackingConfig, PackPlan


@dataclass
class StepShare:
    """One rank's part of an optimizer step, as planned: ``plans`` (items are shapes), the step's load
    balance over the ranks (None on one rank) and the bad records its planning skipped (file, line, reason)."""

    step: int
    plans: list
    balance: Optional[dict] = None
    errors: list = field(default_factory=list)
    digests: dict = field(default_factory=dict)  # per dataset: StepPlanner.digests after this step


@dataclass
class StepData:
    """One rank's packs of a step, decoded (None: a pack another peer decodes, see PackDecoder): ``errors``
    are the planning's skips (the same on every rank), ``decode_errors`` this rank's decoding's,
    ``images_decoded`` the image files decoded for it, ``decode_s`` the worker's time on it, ``digests``
    the planner's after this step."""

    step: int
    batches: list
    balance: Optional[dict] = None
    errors: list = field(default_factory=list)
    decode_errors: list = field(default_factory=list)
    images_decoded: int = 0
    decode_s: float = 0.0
    digests: dict = field(default_factory=dict)

    def pin_memory(self) -> "StepData":
        return replace(self, batches=[batch.pin_memory() if batch is not None else None for batch in self.batches])


class StepPlanner(torch.utils.data.Sampler):
    """The endless StepShares of one data-parallel rank (see the module docstring). ``cost(plan)``: a pack's
    cost for the balancer (e.g. its training FLOPs); with one rank no balancing is done. ``ahead``: steps
    planned ahead in a background thread (0: each step planned when asked for); the shares and the state
    are the same either way. ``digests``: per dataset name, a signed 64-bit running digest of the keys and
    shapes of every pack planned (all ranks' packs, whatever this rank's share)."""

    def __init__(self, stream: MixedStream, packer: Packer, packs_per_rank: int, dp_rank: int = 0, dp_world: int = 1,
                 cost: Optional[Callable[[PackPlan], float]] = None, ahead: int = 0):
        if packs_per_rank < 1:
            raise ValueError(f"packs_per_rank must be at least 1, got {packs_per_rank}")
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
            raise ValueError(f"ahead must be an int >= 0, got {ahead!r}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must lie in [0, dp_world={dp_world}), got {dp_rank}")
        if dp_world > 1 and cost is None:
            raise ValueError("balancing packs over several ranks needs their cost")
        if stream.errors.journal is None:
            stream.errors.journal = []
        self.stream = stream
        self.packer = packer
        self.packs_per_rank = packs_per_rank
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.cost = cost
        self.pending: list[PackPlan] = []
        self.steps = 0
        self.digests: dict[str, int] = {}
        self.ahead = ahead
        self._planning: Optional[_PlanningThread] = None

    def _next_plan(self) -> PackPlan:
        while not self.pending:
            key, shape = self.stream.next()
            self.pending.extend(self.packer.add(shape, key))
        return self.pending.pop(0)

    def plan_step(self) -> StepShare:
        plans = [self._next_plan() for _ in range(self.packs_per_rank * self.dp_world)]
        self.steps += 1
        self._digest(plans)
        errors = self.stream.errors.take_journal()
        if self.dp_world == 1:
            return StepShare(self.steps, plans, None, errors, dict(self.digests))
        costs = [self.cost(plan) for plan in plans]
        assignment = balance(costs, self.dp_world)
        report = {"imbalance": assignment.imbalance, "imbalance_naive": naive_split(costs, self.dp_world).imbalance}
        return StepShare(self.steps, [plans[index] for index in assignment.ranks[self.dp_rank]], report, errors, dict(self.digests))

    def _digest(self, plans: list) -> None:
        """Fold a step's plans into the per-dataset digests (Python's hash of int tuples: the same in every
        process, unlike a string's)."""
        planned: dict[str, list] = {}
        for plan in plans:
            for (name, epoch, position), shape in zip(plan.keys, plan.items):
                planned.setdefault(name, []).append((int(epoch), int(position), len(shape), shape.num_tiles))
        for name, items in planned.items():
            self.digests[name] = hash((self.digests.get(name, 0), tuple(items)))

    def __iter__(self):
        self.close()
        if not self.ahead:
            while True:
                yield self.plan_step()
        self._planning = _PlanningThread(self)
        yield from self._planning

    def close(self) -> None:
        """Stop the planning thread, if any (the planner stays at the last share it yielded)."""
        if self._planning is not None:
            self._planning.stop()
            self._planning = None

    def _state(self) -> dict:
        return copy.deepcopy({
            "steps": self.steps,
            "stream": self.stream.state_dict(),
            "packer": self.packer.state_dict(),
            "pending": [{"batch_index": plan.batch_index, "keys": [list(key) for key in plan.keys]} for plan in self.pending],
            "digests": self.digests,
        })

    def state_dict(self) -> dict:
        """The position after the last share yielded (planned ahead or not)."""
        return self._planning.position if self._planning is not None else self._state()

    def load_state_dict(self, state: dict) -> None:
        """Back to ``state``: the open buffers' and pending plans' shapes are read from the index again."""
        self.close()
        stream = self.stream
        stream.load_state_dict(state["stream"])
        buffers = [[(tuple(key), stream.fetch(key)) for key in keys] for keys in state["packer"]["buffered_keys"]]
        self.packer.restore(state["packer"], buffers)
        self.pending = [
            PackPlan(pending["batch_index"], [tuple(key) for key in pending["keys"]],
                     [self.packer.refit(stream.fetch(key)) for key in pending["keys"]])
            for pending in state["pending"]
        ]
        self.steps = int(state["steps"])
        self.digests = dict(state.get("digests", {}))  # a state without digests starts them afresh, on every rank alike
        stream.errors.take_journal()  # a record met again while restoring was reported when first met


class _PlanningThread:
    """StepPlanner.plan_step run in a daemon thread, up to ``planner.ahead`` shares ahead of the consumer:
    iterating yields the shares in order and keeps ``position``, the planner's state right after the share
    last yielded (what a snapshot of the loader must hold). A planning error is raised to the consumer."""

    def __init__(self, planner: StepPlanner):
        self.position = planner._state()
        self._planner = planner
        self._queue: queue.Queue = queue.Queue(maxsize=planner.ahead)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-planner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                entry = (self._planner.plan_step(), self._planner._state())
            except BaseException as error:  # handed to the consumer, which raises it
                entry = (error, None)
            while not self._stopping.is_set():
                try:
                    self._queue.put(entry, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if entry[1] is None:
                del entry  # see __iter__
                return

    def __iter__(self):
        while True:
            share, state = self._queue.get()
            if state is None:
                try:
                    raise share
                finally:
                    # A local holding the error is in a cycle with its traceback's frames, which keep what it was
                    # raised through (a loader iterator being built, and its worker processes) alive past the
                    # error: the interpreter's exit would wait on those workers forever.
                    del share
            self.position = state
            yield share

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def decoding_peer(step: int, index: int, peers: int) -> int:
    """Which of ``peers`` ranks sharing a step's packs decodes pack ``index`` of step ``step``: the packs
    dealt out in turn from a first peer that moves on by one each step (at one pack a step every peer
    decodes every peers-th step, instead of the first peer every step)."""
    return (step + index) % peers


class PackDecoder(torch.utils.data.Dataset):
    """StepShare -> StepData (see the module docstring). ``datasets``: by name, the RecordDatasets the plans'
    keys name (this object's own: their errors are journaled here). ``peer`` of ``peers``: this rank's place
    among the ranks that train on the same packs (tensor- and context-parallel peers): it decodes the
    share's packs j whose decoding_peer is ``peer`` and leaves None for the others, which their decoding
    peers send (the trainer broadcasts them), so the peers decode each pack once between them."""

    def __init__(self, datasets: Mapping[str, RecordDataset], packing: PackingConfig, seed: int, peer: int = 0, peers: int = 1):
        if not (isinstance(peers, int) and peers >= 1 and isinstance(peer, int) and 0 <= peer < peers):
            raise ValueError(f"need peers >= 1 and 0 <= peer < peers, got peer {peer!r} of {peers!r}")
        self.peer, self.peers = peer, peers
        self.datasets = dict(datasets)
        self.errors = DataErrors(journal=[])
        for dataset in self.datasets.values():
            dataset.errors = self.errors
        self.packer = Packer(packing, seed=seed)

    def __getitem__(self, share: StepShare) -> StepData:
        began = time.perf_counter()
        decoded = sum(dataset.images_decoded for dataset in self.datasets.values())
        batches = [self.decode(plan) if decoding_peer(share.step, index, self.peers) == self.peer else None
                   for index, plan in enumerate(share.plans)]
        return StepData(share.step, batches, share.balance, list(share.errors), self.errors.take_journal(),
                        sum(dataset.images_decoded for dataset in self.datasets.values()) - decoded, time.perf_counter() - began,
                        dict(share.digests))

    def decode(self, plan: PackPlan) -> PackedBatch:
        keys, items = [], []
        for key, shape in zip(plan.keys, plan.items):
            name, epoch, position = key
            dataset = self.datasets[name]
            item = dataset.get(int(epoch), int(position))
            if item is None:
                continue  # counted by the dataset
            item = self.packer.refit(item)
            if item is None or (len(item), item.num_tiles) != (len(shape), shape.num_tiles):
                index = dataset.epoch_order(int(epoch))[int(position)]
                self.errors.record(dataset.file.path, dataset.file.line_number(index),
                                   "changed since indexed: the record's size differs from the data index's")
                continue
            keys.append(key)
            items.append(item)
        if not items:
            encoder = next(iter(self.datasets.values())).encoder
            items = [encoder.encode_text("", source="(empty pack)")]
        return self.packer.collate(PackPlan(plan.batch_index, keys, items))


def _as_is(data):
    return data


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker ignores SIGTERM: a scheduler signalling the whole process group (preemption, scancel) must
    not kill the workers under the step being finished; the training process stops them when it ends."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def start_loader(loader):
    """``iter(loader)``; if starting fails (e.g. the first step's planning raises inside the iterator's
    constructor), the half-built iterator's workers are shut down before the error goes on: they ignore
    SIGTERM, which is how the interpreter ends leftover workers at exit, and the traceback keeps the iterator
    (whose __del__ would shut them down) alive, so left behind the interpreter would wait on them forever."""
    try:
        return iter(loader)
    except BaseException as error:
        for frame, _ in traceback.walk_tb(error.__traceback__):
            iterator = frame.f_locals.get("self")
            if hasattr(iterator, "_shutdown_workers"):  # what the iterator's __del__ runs
                iterator._shutdown_workers()
                break
        raise


def build_loader(planner: StepPlanner, decoder: PackDecoder, num_workers: int, prefetch_factor: int, pin_memory: bool, seed: int):
    """torchdata's StatefulDataLoader yielding this rank's StepData, one per optimizer step."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():  # torchdata calls torch.set_vital, deprecated since torch 2.13
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            decoder, batch_size=None, sampler=planner, num_workers=num_workers, collate_fn=_as_is, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None, snapshot_every_n_steps=1,
            generator=torch.Generator().manual_seed(seed),  # the workers' seeds, without drawing from the global RNG
            worker_init_fn=_ignore_stop_signals,
        )
