"""The ranks agree on their data: check_ranks_agree compares each dataset's digest over the ranks and names
the file whose digest differs, on every rank (no rank is left waiting in a collective)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.data import DatasetSpec
from model.train.trainer import check_ranks_agree

SPECS = [DatasetSpec("a", "/data/a.jsonl"), DatasetSpec("b", "/node-local/b.jsonl")]


def _rank(rank: int, world: int, store_file: str, results) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world)
    try:
        check_ranks_agree({"a": 7, "b": -3}, SPECS, torch.device("cpu"), "the same digests")
        try:
            check_ranks_agree({"a": 7, "b": -3 + rank}, SPECS, torch.device("cpu"), "the packs planned up to step 4")
            results.put((rank, None))
        except ValueError as error:
            results.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_a_digest_differing_between_ranks_is_an_error_naming_the_file_on_every_rank(tmp_path):
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), results), nprocs=2, start_method="spawn")
    messages = dict(results.get(timeout=60) for _ in range(2))
    assert all(message is not None and message.startswith("/node-local/b.jsonl: the packs planned up to step 4 differ between the ranks")
               for message in messages.values()), messages
