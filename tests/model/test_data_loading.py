"""The data index and per-rank loading: shapes measured without decoding equal the decoded items', the
index is cached and rebuilt when its inputs change, the planned packs equal packing the decoded stream,
ranks decode only their own packs, and the StatefulDataLoader resumes exactly (at another world size too)
without decoding anything again."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import (
    DataError,
    ConversationEncoder,
    DataErrors,
    DatasetIndex,
    DatasetSpec,
    ImageTiler,
    MixedStream,
    PackDecoder,
    Packer,
    PackingConfig,
    RecordDataset,
    StepPlanner,
    build_loader,
    check_budget_fits,
    load_or_build_index,
)
from model.data import index as index_module
from model.data import packing as packing_module
from model.data.packing import DROPPED_IN_A_ROW
from model.data.tokenizer import ByteTokenizer

TOKENS_PER_TILE = 4
PACKING = PackingConfig(max_packed_tokens=160, max_tiles=8, max_buffers=3)
SEED = 3
ROOT = Path(__file__).resolve().parents[2]


def _write_data(folder):
    """Three datasets: text, images of several sizes (one record malformed, one image missing, one corrupt
    after a valid header), and preference pairs."""
    images = folder / "img"
    images.mkdir(exist_ok=True)
    for index in range(5):
        Image.new("RGB", (20 + 17 * index, 30 + 9 * (index % 3)), (index * 50, 90, 0)).save(images / f"{index}.png")
    header = (images / "0.png").read_bytes()[:60]  # a PNG whose header reads but whose pixels do not
    (images / "corrupt.png").write_bytes(header)
    with open(folder / "text.jsonl", "w") as handle:
        for index in range(31):
            handle.write(json.dumps({"text": "words " * (1 + index % 9)}) + "\n")
    with open(folder / "mm.jsonl", "w") as handle:
        for index in range(29):
            record = {"image": f"{index % 5}.png", "conversations": [{"from": "human", "value": "q" * (index % 4)},
                                                                   {"from": "gpt", "value": "x" * (index % 7 + 1)}]}
            if index == 11:
                handle.write("{broken\n")
                continue
            if index == 17:
                record["image"] = "absent.png"
            if index == 23:
                record["image"] = "corrupt.png"
            if index == 5:
                record["image"] = ["1.png", "3.png"]
                record["conversations"][0]["value"] = "<image> and <image>"
            handle.write(json.dumps(record) + "\n")
        handle.write("\n")  # a blank line keeps the numbering
    with open(folder / "pairs.jsonl", "w") as handle:
        for index in range(13):
            handle.write(json.dumps({"image": f"{index % 5}.png", "question": "which?", "chosen": "good" * (1 + index % 3),
                                     "rejected": "bad"}) + "\n")
    return [
        DatasetSpec("text", str(folder / "text.jsonl")),
        DatasetSpec("mm", str(folder / "mm.jsonl"), root=str(images), data_augment=True),
        DatasetSpec("pairs", str(folder / "pairs.jsonl"), root=str(images)),
    ]


@pytest.fixture
def data(tmp_path):
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE, system_message=None)
    tiler = ImageTiler(tile_size=28, max_num=4)
    return _write_data(tmp_path), encoder, tiler


def _datasets(specs, encoder, tiler, indexes=None, kinds=("conversation", "text")):
    built = [RecordDataset(spec, encoder, tiler, seed=SEED, index=indexes[spec.name] if indexes else None) for spec in specs]
    return [dataset for dataset in built if dataset.kind in kinds]


def _indexes(specs, encoder, tiler):
    return {spec.name: load_or_build_index(spec, encoder, tiler) for spec in specs}


def _planner(specs, encoder, tiler, indexes, dp_rank=0, dp_world=1, packs_per_rank=2, ahead=0):
    stream = MixedStream(_datasets(specs, encoder, tiler, indexes), 1, 3, DataErrors(journal=[]), shapes=True)
    return StepPlanner(stream, Packer(PACKING, seed=SEED), packs_per_rank, dp_rank, dp_world, cost=lambda plan: float(plan.num_tokens),
                       ahead=ahead)


def _decoder(specs, encoder, tiler, indexes, peer=0, peers=1):
    return PackDecoder({d.name: d for d in _datasets(specs, encoder, tiler, indexes)}, PACKING, SEED, peer, peers)


def _same_batch(a, b):
    return (
        a.sources == b.sources and a.deltas == b.deltas and a.batch_index == b.batch_index
        and all(torch.equal(getattr(a, name), getattr(b, name))
                for name in ("input_ids", "labels", "cu_seqlens", "positions", "loss_weights", "image_flags"))
        and (a.pixel_values is None) == (b.pixel_values is None)
        and (a.pixel_values is None or torch.equal(a.pixel_values, b.pixel_values))
    )


def test_index_shapes_equal_the_decoded_items(data):
    specs, encoder, tiler = data
    for spec in specs:
        index = load_or_build_index(spec, encoder, tiler)
        dataset = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False)
        assert len(index) == len(dataset.file)
        for record in range(len(index)):
            try:
                item = dataset.load_record(record)
            except Exception as error:  # noqa: BLE001 - the index must give the same verdict
                if "corrupt image" in str(error):  # its header reads: found when decoded
                    continue
                with pytest.raises(type(error), match=str(error).split(":")[0]):
                    index.item_shape(record)
                continue
            assert index.item_shape(record) == item.shape()
    mm = load_or_build_index(specs[1], encoder, tiler)
    reasons = {int(mm.line_numbers[row]): reason for row, reason in mm.reasons.items()}
    assert set(reasons) == {12, 18}
    assert reasons[12].startswith("malformed JSON") and reasons[18].startswith("missing image")
    two = tiler.for_images(2)  # the record's two images share the tile budget
    assert mm.item_shape(5).tiles_per_image == [two.num_tiles(37, 39), two.num_tiles(71, 30)]


def test_shapes_truncate_as_the_samples_do(data):
    specs, encoder, tiler = data
    dataset = RecordDataset(specs[1], encoder, tiler, augment=False, shuffle=False)
    sample = dataset.load_record(5)
    shape = sample.shape()
    for tokens in range(1, len(sample) + 2):
        for tiles in range(0, sample.num_tiles + 2):
            cut = sample.truncated(tokens, tiles)
            assert shape.truncated(tokens, tiles) == cut.shape()
            assert shape.truncated(tokens, tiles).has_target() == cut.has_target()


def test_index_is_cached_and_rebuilt_when_its_inputs_change(data, monkeypatch):
    specs, encoder, tiler = data
    first = load_or_build_index(specs[0], encoder, tiler)
    cached = [name for name in os.listdir(os.path.dirname(specs[0].annotation)) if ".index-" in name]
    assert cached == [os.path.basename(index_module.cache_path(specs[0], first.fingerprint))]

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(index_module, "_measure", fail)
    again = load_or_build_index(specs[0], encoder, tiler)
    assert again.fingerprint == first.fingerprint and (again.sample_length == first.sample_length).all()
    with pytest.raises(AssertionError, match="measured again"):  # other settings, another index
        load_or_build_index(specs[0], ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE), tiler)
    monkeypatch.undo()
    with open(specs[0].annotation, "a") as handle:
        handle.write(json.dumps({"text": "one more"}) + "\n")
    changed = load_or_build_index(specs[0], encoder, tiler)
    assert len(changed) == len(first) + 1 and changed.fingerprint != first.fingerprint
    names = [name for name in os.listdir(os.path.dirname(specs[0].annotation)) if ".index-" in name]
    assert len(names) == 2  # the index of the file before the change stays: used just now, a job may map it


def test_indexes_of_other_settings_stay_cached_beside_each_other(data, monkeypatch):
    """Two jobs with different settings on one annotation file: each one's index is built once, then both
    load from the cache, whichever was built last."""
    specs, encoder, tiler = data
    other = ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE + 1, system_message=None)
    first, second = load_or_build_index(specs[0], encoder, tiler), load_or_build_index(specs[0], other, tiler)
    assert first.fingerprint != second.fingerprint

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(index_module, "_measure", fail)
    for settings, built in ((encoder, first), (other, second), (encoder, first)):
        cached = load_or_build_index(specs[0], settings, tiler)
        assert cached.fingerprint == built.fingerprint and np.array_equal(cached.sample_length, built.sample_length)


def test_a_build_deletes_only_indexes_beyond_the_most_recently_used_and_long_unused(data):
    """After a build, of the other indexes of the same file the KEEP_INDEXES - 1 most recently used stay (with
    the new one: KEEP_INDEXES); beyond them those unused for UNUSED_FOR_S go, but none used recently, however
    many. Loading an index marks it used. Another file's indexes are not touched."""
    import time

    specs, encoder, tiler = data
    folder = os.path.dirname(specs[0].annotation)
    keep, unused = index_module.KEEP_INDEXES, index_module.UNUSED_FOR_S

    def indexes(names_and_ages: dict, annotation="text.jsonl"):
        for name, age in names_and_ages.items():
            path = os.path.join(folder, f"{annotation}.index-{name}.npz")
            open(path, "wb").close()
            os.utime(path, (time.time() - age, time.time() - age))

    def cached() -> set:
        return {name.split(".index-")[1][:-len(".npz")] for name in os.listdir(folder) if name.startswith("text.jsonl.index-")}

    indexes({f"old{rank}": unused + 3600 * (rank + 1) for rank in range(keep + 2)})  # old0 the most recently used
    indexes({"other": 10 * unused}, "mm.jsonl")
    first = load_or_build_index(specs[0], encoder, tiler)
    assert cached() == {first.fingerprint} | {f"old{rank}" for rank in range(keep - 1)}
    assert os.path.exists(os.path.join(folder, "mm.jsonl.index-other.npz"))

    indexes({f"recent{rank}": 60 * (rank + 1) for rank in range(keep + 1)})  # used in the last minutes: all stay
    other = ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE + 1, system_message=None)
    second = load_or_build_index(specs[0], other, tiler)
    assert cached() == {second.fingerprint, first.fingerprint} | {f"recent{rank}" for rank in range(keep + 1)}

    path = index_module.cache_path(specs[0], first.fingerprint)
    os.utime(path, (time.time() - 2 * unused, time.time() - 2 * unused))
    load_or_build_index(specs[0], encoder, tiler)
    assert time.time() - os.stat(path).st_mtime < 3600  # loaded: used now


def test_a_cached_index_is_memory_mapped_and_equal_to_the_built_one(data):
    specs, encoder, tiler = data
    for spec in specs:
        built = load_or_build_index(spec, encoder, tiler)
        cached = load_or_build_index(spec, encoder, tiler)
        for name in ("offsets", "line_numbers", "kinds", "record_samples", "sample_length", "sample_first_target",
                     "sample_images", "image_span", "image_tiles", "video_frame_totals", "has_reference"):
            stored, original = getattr(cached, name), getattr(built, name)
            assert stored.size == 0 or isinstance(stored.base, np.memmap), name  # a plain view of the mapped pages
            assert stored.dtype == original.dtype and np.array_equal(stored, original), name
        assert cached.reasons == built.reasons
        for record in range(len(built)):
            try:
                assert cached.item_shape(record) == built.item_shape(record)
            except DataError as error:
                assert str(error) == built.reasons[record]


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set size from /proc")
def test_loading_a_large_index_reads_only_what_is_used(tmp_path):
    """An index of 2M records (160 MB of arrays): loading it from the cache adds a small fraction of that to
    the process's resident memory (the arrays are mapped, not read), and a record's shape reads fine."""
    records = 2_000_000
    arrays = {
        "offsets": np.arange(records, dtype=np.int64) * 100, "line_numbers": np.arange(1, records + 1, dtype=np.int64),
        "kinds": np.zeros(records, dtype=np.int8), "record_samples": np.arange(records + 1, dtype=np.int64),
        "sample_length": np.full(records, 300, dtype=np.int64), "sample_first_target": np.full(records, 280, dtype=np.int64),
        "sample_images": np.arange(records + 1, dtype=np.int64), "image_span": np.tile(np.array([[10, 28]], dtype=np.int64), (records, 1)),
        "image_tiles": np.ones(records, dtype=np.int64), "video_frame_totals": np.zeros(records, dtype=np.int64),
        "has_reference": np.zeros(records, dtype=np.int8),
        "reasons": np.array("{}"),
    }
    size = sum(array.nbytes for array in arrays.values())
    path = str(tmp_path / "big.jsonl.index-0.npz")
    index_module.DatasetIndex(str(tmp_path / "big.jsonl"), arrays, "0").save(path)
    del arrays
    before = _resident_bytes()
    index = index_module.DatasetIndex.load(path, str(tmp_path / "big.jsonl"), "0")
    added = _resident_bytes() - before
    assert added < 0.05 * size, (added, size)
    shape = index.item_shape(records - 1)
    assert (shape.length, shape.first_target, shape.spans, shape.tiles_per_image) == (300, 280, [(10, 28)], [1])


def test_index_of_a_read_only_folder_goes_to_the_cache_folder(data, tmp_path, monkeypatch):
    specs, encoder, tiler = data
    monkeypatch.setenv("INTERNVL3_INDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(index_module.os, "access", lambda path, mode: False)
    index = load_or_build_index(specs[0], encoder, tiler)
    assert os.path.isfile(tmp_path / "cache" / os.path.basename(index_module.cache_path(specs[0], index.fingerprint)))


def test_planned_packs_equal_packing_the_decoded_stream(data):
    """The old way (every record decoded, then packed) and the planned way give the same batches."""
    specs, encoder, tiler = data
    images = os.path.dirname(specs[1].root + "/")
    with open(os.path.join(images, "0.png"), "rb") as source, open(os.path.join(images, "corrupt.png"), "wb") as target:
        target.write(source.read())  # readable now: both ways see the same records
    indexes = _indexes(specs, encoder, tiler)
    stream = MixedStream(_datasets(specs, encoder, tiler), 1, 3, DataErrors())
    packer = Packer(PACKING, seed=SEED)
    expected = []
    while len(expected) < 24:
        key, item = stream.next()
        expected += [packer.collate(plan) for plan in packer.add(item, key)]
    planner, decoder = _planner(specs, encoder, tiler, indexes), _decoder(specs, encoder, tiler, indexes)
    got = [batch for _ in range(12) for batch in decoder[planner.plan_step()].batches]
    assert all(_same_batch(a, b) for a, b in zip(got, expected[:24]))
    assert stream.errors.total == planner.stream.errors.total == 2  # the malformed record and the missing image


def test_ranks_decode_only_their_own_packs(data):
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    single, single_decoder = _planner(specs, encoder, tiler, indexes, packs_per_rank=4), _decoder(specs, encoder, tiler, indexes)
    ranks = [_planner(specs, encoder, tiler, indexes, rank, 2, packs_per_rank=2) for rank in range(2)]
    decoders = [_decoder(specs, encoder, tiler, indexes) for _ in range(2)]
    for _ in range(6):
        whole = single_decoder[single.plan_step()]
        parts = [decoder[planner.plan_step()] for planner, decoder in zip(ranks, decoders)]
        by_index = {batch.batch_index: batch for part in parts for batch in part.batches}
        assert sorted(by_index) == sorted(batch.batch_index for batch in whole.batches)
        assert all(_same_batch(by_index[batch.batch_index], batch) for batch in whole.batches)
        assert sum(part.images_decoded for part in parts) == whole.images_decoded
        assert parts[0].balance == parts[1].balance and parts[0].balance["imbalance"] <= parts[0].balance["imbalance_naive"]
    assert sum(d.images_decoded for d in decoders[0].datasets.values()) < sum(d.images_decoded for d in single_decoder.datasets.values())


@pytest.mark.parametrize("packs", [4, 1])
def test_peers_sharing_packs_decode_each_pack_once(data, packs):
    """Three peers (tensor- or context-parallel ranks) on the same shares of ``packs`` packs: at step s peer p
    decodes packs j with (s + j) % 3 == p and leaves the others None; together they give every pack of one
    decoder, decoding the images it did; with one pack a step the peers take turns."""
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    planners = [_planner(specs, encoder, tiler, indexes, packs_per_rank=packs) for _ in range(4)]
    whole_decoder = _decoder(specs, encoder, tiler, indexes)
    peers = [_decoder(specs, encoder, tiler, indexes, peer, 3) for peer in range(3)]
    decoded = [0, 0, 0]
    for _ in range(6):
        whole = whole_decoder[planners[0].plan_step()]
        parts = [decoder[planner.plan_step()] for planner, decoder in zip(planners[1:], peers)]
        for index, batch in enumerate(whole.batches):
            owner = (whole.step + index) % 3
            assert [part.batches[index] is not None for part in parts] == [peer == owner for peer in range(3)]
            assert _same_batch(parts[owner].batches[index], batch)
            decoded[owner] += 1
        assert sum(part.images_decoded for part in parts) == whole.images_decoded
    assert decoded == [2 * packs] * 3
    with pytest.raises(ValueError, match="peer"):
        _decoder(specs, encoder, tiler, indexes, 3, 3)


def test_a_record_failing_to_decode_leaves_its_pack_and_is_reported(data):
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    planner, decoder = _planner(specs, encoder, tiler, indexes), _decoder(specs, encoder, tiler, indexes)
    for _ in range(20):
        share = planner.plan_step()
        step = decoder[share]
        planned = [source for plan in share.plans for item in plan.items for source in [item.source]]
        if any(source.endswith("mm.jsonl:24") for source in planned):
            break
    else:
        pytest.fail("the corrupt image's record was never planned")
    assert [line for _, line, _ in step.decode_errors] == [24] and "corrupt image" in step.decode_errors[0][2]
    decoded = [source for batch in step.batches for source in batch.sources]
    assert not any(source.endswith("mm.jsonl:24") for source in decoded)
    # A pack with no record left is a one-token pack with no target.
    plan = next(plan for plan in share.plans if any(item.source.endswith(":24") for item in plan.items))
    plan.keys, plan.items = [key for key, item in zip(plan.keys, plan.items) if item.source.endswith(":24")], \
        [item for item in plan.items if item.source.endswith(":24")]
    empty = decoder.decode(plan)
    assert empty.num_tokens == 1 and float(empty.loss_weights.sum()) == 0.0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly_without_decoding_again(data, num_workers):
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)

    def loader(planner=None):
        planner = planner or _planner(specs, encoder, tiler, indexes)
        return build_loader(planner, _decoder(specs, encoder, tiler, indexes), num_workers, 2, False, SEED)

    expected = [step for step, _ in zip(loader(), range(14))]
    first = loader()
    steps = iter(first)
    head = [next(steps) for _ in range(6)]
    state = first.state_dict()
    del steps

    resumed = loader()
    resumed.load_state_dict(state)
    tail = [step for step, _ in zip(resumed, range(8))]
    for got, want in zip(head + tail, expected):
        assert got.step == want.step and got.errors == want.errors and got.decode_errors == want.decode_errors
        assert all(_same_batch(a, b) for a, b in zip(got.batches, want.batches))
    # Decoded after the resume: the images of its steps only (the restore decodes nothing).
    assert sum(step.images_decoded for step in tail) == sum(step.images_decoded for step in expected[6:])


def test_a_resume_at_another_world_size_continues_the_same_packs(data):
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    single = _planner(specs, encoder, tiler, indexes, packs_per_rank=4)
    for _ in range(5):
        single.plan_step()
    state = json.loads(json.dumps(single.state_dict()))  # JSON-able
    ranks = [_planner(specs, encoder, tiler, indexes, rank, 2) for rank in range(2)]
    for planner in ranks:
        planner.load_state_dict(state)
    for _ in range(4):
        whole = single.plan_step()
        parts = [planner.plan_step() for planner in ranks]
        assert sorted(plan.batch_index for part in parts for plan in part.plans) == sorted(plan.batch_index for plan in whole.plans)
        assert {tuple(map(tuple, plan.keys)) for part in parts for plan in part.plans} == {tuple(map(tuple, plan.keys)) for plan in whole.plans}


def test_planner_arguments_are_checked(data):
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    stream = MixedStream(_datasets(specs, encoder, tiler, indexes), 1, 3, DataErrors(journal=[]), shapes=True)
    with pytest.raises(ValueError, match="packs_per_rank"):
        StepPlanner(stream, Packer(PACKING), 0)
    with pytest.raises(ValueError, match="dp_rank"):
        StepPlanner(stream, Packer(PACKING), 1, 2, 2, cost=len)
    with pytest.raises(ValueError, match="cost"):
        StepPlanner(stream, Packer(PACKING), 1, 0, 2)
    with pytest.raises(ValueError, match="no index"):
        RecordDataset(specs[0], encoder, tiler).get_shape(0, 0)
    assert isinstance(indexes["text"], DatasetIndex)


def _survives(shape, config) -> bool:
    """Whether Packer.add keeps ``shape`` (whole or truncated) under ``config``."""
    packer = Packer(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packer.add(shape)
    return packer.dropped == 0


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
@pytest.mark.parametrize("at_once", [3, None])
def test_a_budget_no_sample_fits_is_refused_from_the_index(data, overlong, at_once, monkeypatch):
    """check_budget_fits refuses a budget exactly when no sample of the index stays in a pack as the
    Packer fits it, naming the budget and the sample needing the fewest tokens (also measuring the samples
    3 at a time)."""
    if at_once is not None:
        monkeypatch.setattr(packing_module, "_CHECKED_AT_ONCE", at_once)
    specs, encoder, tiler = data
    index = _indexes(specs, encoder, tiler)["mm"]
    shapes = [index.item_shape(record) for record in range(len(index)) if record not in index.reasons]
    for tokens, tiles in [(2, 8), (12, 8), (20, 0), (20, 1), (40, 2), (60, 8), (400, 8)]:
        config = PackingConfig(max_packed_tokens=tokens, max_tiles=tiles, overlong=overlong)
        if any(_survives(shape, config) for shape in shapes):
            check_budget_fits(config, [index])
            continue
        with pytest.raises(ValueError) as caught:
            check_budget_fits(config, [index])
        least = min(budget for budget in range(2, 2000)
                    if any(_survives(shape, PackingConfig(max_packed_tokens=budget, max_tiles=99, overlong=overlong)) for shape in shapes))
        message = str(caught.value)
        assert message.startswith(f"no sample fits the pack budget (data.max_packed_tokens {tokens}, data.max_tiles {tiles}): "
                                  f"the smallest, {index.path}:")
        assert f"needs {least} tokens / " in message and f"(data.overlong {overlong}), over data.max_" in message
        line = int(message.split(f"{index.path}:")[1].split(",")[0])
        named = index.item_shape(int(np.flatnonzero(index.line_numbers == line)[0]))
        assert _survives(named, PackingConfig(max_packed_tokens=least, max_tiles=99, overlong=overlong))


def test_planning_with_a_budget_no_sample_fits_raises(data, monkeypatch):
    """Planning on a budget that drops every sample ends in the Packer's ValueError (in the planning
    thread too), not in an endless draw (bounded here so that a planner without the guard fails)."""
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    for ahead in (0, 2):
        stream = MixedStream(_datasets(specs, encoder, tiler, indexes, kinds=("conversation",)), 1, 3, DataErrors(journal=[]), shapes=True)
        draw, draws = stream.next, []

        def bounded_draw():
            draws.append(1)
            if len(draws) > 2 * DROPPED_IN_A_ROW:
                raise RuntimeError("the planner kept drawing samples")
            return draw()

        monkeypatch.setattr(stream, "next", bounded_draw)
        planner = StepPlanner(stream, Packer(PackingConfig(max_packed_tokens=6, max_tiles=8)), 1, ahead=ahead)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=f"{DROPPED_IN_A_ROW} samples in a row dropped: none fits the pack budget "
                                                 r"\(data.max_packed_tokens 6, data.max_tiles 8\); the smallest of them, .*mm.jsonl:"):
                next(iter(planner))
        planner.close()
        assert len(draws) == DROPPED_IN_A_ROW


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from model.train.demo_data import DemoDataConfig, generate

    folder = tmp_path_factory.mktemp("demo_data")
    generate(str(folder), config=DemoDataConfig(train_images=8, eval_images=2, preference_pairs=2, image_size=56, train_videos=1,
                                                eval_videos=1, clip_frames=4))
    return folder


@pytest.mark.parametrize("mode, meta, tokens, error", [
    # The reported hang: the demo's SFT (multimodal data only) with a budget below every sample's first target,
    # refused from the index before anything is planned.
    ("sft", "meta.json", 16, "no sample fits the pack budget (data.max_packed_tokens 16, data.max_tiles 64): the smallest, "),
    # MPO pairs whose samples need 65 tokens each to keep a target (the index check passes at 100) but a pair
    # truncates each of its samples to half the budget: every pair is dropped, and the Packer's guard ends it.
    ("mpo", "meta_mpo.json", 100, f"{DROPPED_IN_A_ROW} samples in a row dropped: none fits the pack budget "
                                  "(data.max_packed_tokens 100, data.max_tiles 64); the smallest of them, "),
])
def test_the_training_command_ends_a_budget_no_sample_fits_with_one_line(demo_data, tmp_path, mode, meta, tokens, error):
    """A subprocess with a timeout: without the checks the planner draws samples forever (a SIGTERM does not
    stop it), and an error raised while the loader starts must not leave the interpreter waiting on its workers."""
    (tmp_path / "run.yaml").write_text(f"cpu_threads: 1\ndata: {{max_packed_tokens: {tokens}}}\n")
    command = [sys.executable, "-W", "ignore", "-m", "model.train", "--preset", "demo", "--mode", mode, "--config",
               str(tmp_path / "run.yaml"), "--data", str(demo_data / meta), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
               "--no-progress"]
    ended = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert ended.returncode == 2, ended.stderr[-2000:]
    assert ended.stderr.startswith(f"python -m model.train: error: {error}") and ended.stderr.count("\n") == 1


def test_several_images_share_the_tile_budget(tmp_path):
    """InternVL's rule: each of a sample's n images is tiled with at most max_num // n tiles (at least
    min_num), in the decoded sample and in the index alike."""
    Image.new("RGB", (120, 28), (200, 0, 0)).save(tmp_path / "wide.png")
    with open(tmp_path / "a.jsonl", "w") as handle:
        for images in (["wide.png"], ["wide.png", "wide.png"], ["wide.png"] * 5):
            handle.write(json.dumps({"image": images, "conversations": [
                {"from": "human", "value": "<image>" * len(images)}, {"from": "gpt", "value": "ok"}]}) + "\n")
    spec = DatasetSpec("a", str(tmp_path / "a.jsonl"), root=str(tmp_path))
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE, system_message=None)
    tiler = ImageTiler(tile_size=28, max_num=4)
    assert tiler.for_images(2).max_num == 2 and tiler.for_images(5).max_num == 1 and tiler.for_images(1) is tiler
    dataset = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False)
    index = load_or_build_index(spec, encoder, tiler)
    expected = [[5], [3, 3], [1] * 5]  # a 4:1 image: 4 tiles + thumbnail, 2 + thumbnail, 1
    for record, tiles in enumerate(expected):
        sample = dataset.load_record(record)
        assert sample.tiles_per_image == tiles and sample.pixel_values.shape[0] == sum(tiles)
        assert index.item_shape(record) == sample.shape()


def _keys(share) -> list:
    return [[tuple(key) for key in plan.keys] for plan in share.plans]


def test_planning_ahead_in_a_thread_gives_the_same_shares_states_and_resume(data):
    """StepPlanner(ahead=2) plans in a thread of its own: the same shares as planning on demand, its
    state_dict the position right after the share last taken (not the steps planned ahead), and restoring it
    (which stops the thread) continues as the uninterrupted planner does."""
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    plain = _planner(specs, encoder, tiler, indexes, dp_rank=1, dp_world=2)
    expected = [plain.plan_step() for _ in range(12)]
    ahead = _planner(specs, encoder, tiler, indexes, dp_rank=1, dp_world=2, ahead=2)
    shares = iter(ahead)
    taken = [next(shares) for _ in range(5)]
    assert [_keys(share) for share in taken] == [_keys(share) for share in expected[:5]]
    assert [share.digests for share in taken] == [share.digests for share in expected[:5]]
    state = ahead.state_dict()
    assert state["steps"] == 5
    ahead.load_state_dict(state)
    rest = iter(ahead)
    assert [_keys(next(rest)) for _ in range(7)] == [_keys(share) for share in expected[5:]]
    ahead.close()
    with pytest.raises(ValueError, match="ahead"):
        _planner(specs, encoder, tiler, indexes, ahead=-1)


def test_plan_digests_agree_between_ranks_and_name_a_changed_record(data, tmp_path):
    """The per-dataset digests cover every rank's packs (equal for dp ranks 0 and 1), and a record whose
    shape differs in one rank's copy of a file changes that file's index content digest (only) and its
    dataset's plan digest."""
    specs, encoder, tiler = data
    indexes = _indexes(specs, encoder, tiler)
    ranks = [_planner(specs, encoder, tiler, indexes, dp_rank=rank, dp_world=2) for rank in range(2)]
    steps = [[planner.plan_step() for _ in range(10)] for planner in ranks]
    assert [share.digests for share in steps[0]] == [share.digests for share in steps[1]]
    assert set(steps[0][-1].digests) == {"text", "mm"}

    copy = tmp_path / "copy"
    copy.mkdir()
    lines = open(specs[0].annotation).read().splitlines()
    lines[3] = json.dumps({"text": "a much longer text " * 3})
    (copy / "text.jsonl").write_text("\n".join(lines) + "\n")
    changed_specs = [DatasetSpec("text", str(copy / "text.jsonl"))] + specs[1:]
    changed_indexes = _indexes(changed_specs, encoder, tiler)
    assert changed_indexes["text"].content_digest() != indexes["text"].content_digest()
    assert changed_indexes["mm"].content_digest() == indexes["mm"].content_digest()
    changed = _planner(changed_specs, encoder, tiler, changed_indexes, dp_rank=0, dp_world=2)
    last = [changed.plan_step() for _ in range(10)][-1]
    assert last.digests["text"] != steps[0][-1].digests["text"]
