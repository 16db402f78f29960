"""Meta JSON and JSONL datasets: record kinds, bad records reported with file and line (each once), repeat_time."""

import json
import types

import numpy as np
import pytest
from PIL import Image

from model.data.conversation import ConversationEncoder, PreferencePair, Sample
from model.data.datasets import DataErrors, DatasetSpec, RecordDataset, load_meta
from model.data.tiling import ImageTiler
from model.data.tokenizer import ByteTokenizer


def _turns(question="q", answer="a"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def data_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (60, 30), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(images / "blue.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    conversation_lines = [
        json.dumps({"image": "red.png", "conversations": _turns("<image>\nwhat color?", "red")}),  # line 1
        "",  # line 2: blank, skipped
        '{"image": "red.png", "conversations": [',  # line 3: malformed JSON
        json.dumps({"image": "missing.png", "conversations": _turns()}),  # line 4: missing image
        json.dumps({"image": "corrupt.png", "conversations": _turns()}),  # line 5: corrupt image
        json.dumps({"image": ["red.png", "blue.png"], "conversations": _turns("<image> or <image>?", "left")}),  # line 6
        json.dumps({"conversations": []}),  # line 7: no turns
        json.dumps([1, 2]),  # line 8: not an object
        json.dumps({"conversations": _turns("plain", "text")}),  # line 9: a conversation without images
    ]
    (tmp_path / "conv.jsonl").write_text("\n".join(conversation_lines) + "\n")
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(10)) + "\n")
    preference_lines = [
        json.dumps({"image": "blue.png", "question": "<image>color?", "chosen": "blue", "rejected": "red"}),
        json.dumps({"image": "blue.png", "prompt": "color?", "chosen": "blue"}),  # line 2: no rejected
    ]
    (tmp_path / "pref.jsonl").write_text("\n".join(preference_lines) + "\n")
    meta = {
        "conv": {"root": "images", "annotation": "conv.jsonl", "repeat_time": 1, "length": 8, "data_augment": True},
        "text": {"root": "", "annotation": "text.jsonl", "repeat_time": 0.5, "length": 10},
        "pref": {"root": "images", "annotation": "pref.jsonl", "repeat_time": 1, "length": 2},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def _datasets(data_dir, seed=0, errors=None):
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=1, system_message=None)
    tiler = ImageTiler(tile_size=28, max_num=4)
    errors = errors if errors is not None else DataErrors()
    return {spec.name: RecordDataset(spec, encoder, tiler, errors, seed=seed) for spec in load_meta(str(data_dir / "meta.json"))}, errors


def test_meta_and_kinds(data_dir):
    datasets, _ = _datasets(data_dir)
    conv, text, pref = datasets["conv"], datasets["text"], datasets["pref"]
    assert conv.spec.root == str(data_dir / "images") and conv.spec.annotation == str(data_dir / "conv.jsonl")
    assert (conv.kind, conv.modality, conv.augment) == ("conversation", "multimodal", True)
    assert (text.kind, text.modality, text.augment) == ("text", "language", False)
    assert (pref.kind, pref.modality) == ("preference", "multimodal")
    assert len(conv) == 8 and len(text) == 5 and len(pref) == 2


def test_bad_records_reported_with_file_and_line(data_dir):
    datasets, errors = _datasets(data_dir)
    items = list(datasets["conv"].iterate(epoch=0))
    assert len(items) == 3 and all(isinstance(item, Sample) for item in items)
    path = str(data_dir / "conv.jsonl")
    reported = sorted((file, line) for file, line, _ in errors.examples)
    assert reported == [(path, 3), (path, 4), (path, 5), (path, 7), (path, 8)]
    reasons = {line: reason for _, line, reason in errors.examples}
    assert reasons[3].startswith("malformed JSON") and reasons[4].startswith("missing image")
    assert reasons[5].startswith("corrupt image") and reasons[8].startswith("malformed record")
    assert errors.total == 5 and "5 records skipped" in errors.summary() and f"{path}:4" in errors.summary()
    by_source = {item.source: item for item in items}
    # red.png is 60x30 (aspect 2; (2,1) matches, (4,2) is over max_num 4): grid (2,1) + thumbnail = 3 tiles;
    # blue.png is 30x30: (1,1), and (2,2) needs area > 0.5*28^2*4 = 1568 > 900: 1 tile.
    assert by_source[f"{path}:6"].tiles_per_image == [3, 1]
    assert by_source[f"{path}:1"].tiles_per_image == [3] and by_source[f"{path}:9"].pixel_values is None

    pref_items = list(datasets["pref"].iterate())
    assert len(pref_items) == 1 and isinstance(pref_items[0], PreferencePair)
    assert (str(data_dir / "pref.jsonl"), 2) in [(f, l) for f, l, _ in errors.examples]
    restored = DataErrors()
    restored.load_state_dict(json.loads(json.dumps(errors.state_dict())))
    assert restored.summary() == errors.summary()


def test_a_bad_record_read_again_counts_once_and_the_counts_resume_exactly(data_dir):
    datasets, errors = _datasets(data_dir)
    conv = datasets["conv"]
    for epoch in (0, 1):  # the dataset wraps around: its five bad records are read twice
        list(conv.iterate(epoch))
    assert (errors.total, errors.occurrences, len(errors), sum(errors.by_reason.values())) == (5, 10, 5, 5)
    assert len(errors.examples) == 5
    assert errors.summary().startswith("data errors: 5 records skipped (10 skips: some were read more than once)")
    restored = DataErrors()
    restored.load_state_dict(json.loads(json.dumps(errors.state_dict())))
    assert restored.state_dict() == errors.state_dict()
    conv.errors = restored
    list(conv.iterate(2))
    assert (restored.total, restored.occurrences) == (5, 15)


def test_data_errors_load_a_state_saved_before_distinct_counting():
    # Then "total" counted every skip and there were no "records": the counts stand, the examples are known.
    errors = DataErrors()
    errors.load_state_dict({"total": 3, "by_reason": {"malformed JSON": 3}, "examples": [["a.jsonl", 2, "malformed JSON: x"]] * 3})
    assert (errors.total, errors.occurrences, errors.examples) == (3, 3, [("a.jsonl", 2, "malformed JSON: x")])
    errors.record("a.jsonl", 2, "malformed JSON: x")
    errors.record("a.jsonl", 5, "malformed JSON: y")
    assert (errors.total, errors.occurrences) == (4, 5)


def test_blue_square_single_tile(data_dir):
    datasets, _ = _datasets(data_dir)
    record = datasets["conv"].load_record(4)  # line 6 (the blank line 2 has no index)
    assert record.tiles_per_image == [3, 1] and record.pixel_values.shape == (4, 3, 28, 28)


def test_epoch_orders_and_repeat_time(data_dir):
    datasets, _ = _datasets(data_dir)
    text = datasets["text"]
    first, second = text.epoch_order(0), text.epoch_order(1)
    assert sorted(first) == sorted(second) and len(set(first)) == 5  # the same subsample, reshuffled
    again, _ = _datasets(data_dir)
    assert np.array_equal(again["text"].epoch_order(0), first) and np.array_equal(again["text"].epoch_order(1), second)
    other_seed, _ = _datasets(data_dir, seed=1)
    assert not np.array_equal(other_seed["text"].epoch_order(0), first)

    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=1, system_message=None)
    spec = DatasetSpec(name="t", annotation=str(data_dir / "text.jsonl"), repeat_time=2.5)
    repeated = RecordDataset(spec, encoder, ImageTiler(tile_size=28))
    order = repeated.epoch_order(0).tolist()
    assert len(order) == 25 and all(order.count(i) in (2, 3) for i in range(10))
    assert sum(order.count(i) == 3 for i in range(10)) == 5
    with pytest.raises(ValueError):
        DatasetSpec(name="t", annotation="x", repeat_time=0)


def test_augmentation_is_seeded_by_position(data_dir):
    first, _ = _datasets(data_dir)
    second, _ = _datasets(data_dir)
    a = first["conv"].get(0, first["conv"].epoch_order(0).tolist().index(0))
    b = second["conv"].get(0, second["conv"].epoch_order(0).tolist().index(0))
    assert a.pixel_values.equal(b.pixel_values)
    plain = first["conv"].load_record(0)
    assert not plain.pixel_values.equal(a.pixel_values)  # the JPEG round trip changed the pixels


def _index(records: int):
    """What a RecordDataset takes from a DatasetIndex of ``records`` records: their offsets (no file is read)."""
    return types.SimpleNamespace(offsets=np.zeros(records, np.int64), line_numbers=np.zeros(records, np.int64))


def _indexed_dataset(folder, index, name="big", seed=0, repeat_time=1.0):
    """A text dataset of ``index``'s records."""
    spec = DatasetSpec(name, str(folder / f"{name}.jsonl"), kind="text", modality="language", repeat_time=repeat_time)
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=1, system_message=None)
    return RecordDataset(spec, encoder, ImageTiler(tile_size=28), seed=seed, index=index)


def test_an_epoch_order_of_10m_records_takes_40_mb(tmp_path):
    """The order of an epoch of 10M records: an int32 permutation, 40 MB at its peak (tracemalloc over building
    the dataset and the order), the same built again (another rank), another in the next epoch."""
    import tracemalloc

    records = 10_000_000
    index = _index(records)
    tracemalloc.start()
    try:
        dataset = _indexed_dataset(tmp_path, index)
        order = dataset.epoch_order(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert order.dtype == np.int32 and peak < 100 * 2**20, peak
    assert np.array_equal(np.sort(order), np.arange(records, dtype=np.int32))
    assert np.array_equal(_indexed_dataset(tmp_path, index).epoch_order(0), order)
    assert not np.array_equal(dataset.epoch_order(1)[:100], order[:100])


def test_epoch_orders_are_seeded_by_seed_name_and_epoch(tmp_path):
    index = _index(1000)
    orders = {(seed, name, epoch): _indexed_dataset(tmp_path, index, name, seed, repeat_time=1.5).epoch_order(epoch).tolist()
              for seed in (0, 1) for name in ("a", "b") for epoch in (0, 1)}
    assert len({tuple(order) for order in orders.values()}) == 8
    assert orders[0, "a", 0] == _indexed_dataset(tmp_path, index, "a", 0, repeat_time=1.5).epoch_order(0).tolist()
    for (seed, name, epoch), order in orders.items():
        counts = np.bincount(order, minlength=1000)
        assert len(order) == 1500 and set(counts.tolist()) == {1, 2}
        assert np.array_equal(counts, np.bincount(orders[seed, name, 1 - epoch], minlength=1000))  # the same subsample every epoch
    with pytest.raises(ValueError):  # the order is the dataset's own
        _indexed_dataset(tmp_path, index).epoch_order(0)[0] = 1
