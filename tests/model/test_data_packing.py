"""Packing invariants (budgets, cu_seqlens, labels shift, V2PE positions, loss weights) and the
language/multimodal mixing stream (its resume: tests/model/test_data_loading.py)."""

import json
import math
import random
import warnings

import pytest
import torch

from model.data.conversation import IGNORE_INDEX, ConversationEncoder
from model.data.datasets import DataErrors, DatasetSpec, RecordDataset
from model.data.mixing import MixedStream
from model.data.packing import DELTA_CHOICES, DROPPED_IN_A_ROW, Packer, PackingConfig, collate, shift_labels
from model.data.tiling import ImageTiler
from model.data.tokenizer import ByteTokenizer

TOKENS_PER_TILE = 4


@pytest.fixture(scope="module")
def encoder():
    return ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE, system_message=None)


def _random_sample(encoder, rng, source=""):
    images = [torch.randn(rng.randint(1, 3), 3, 28, 28) for _ in range(rng.randint(0, 2))]
    question = "<image>" * len(images) + "q" * rng.randint(0, 30)
    answer = "a" * rng.randint(1, 40)
    return encoder.encode_conversation([{"from": "human", "value": question}, {"from": "gpt", "value": answer}], images, source)


def _check_batch(batch, config):
    bounds = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == batch.num_tokens
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert all(length > 0 for length in lengths) and batch.max_seqlen == max(lengths)
    assert batch.num_tokens <= config.max_packed_tokens and batch.num_tiles <= config.max_tiles
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    assert batch.positions.dtype == batch.loss_weights.dtype == torch.float32 and batch.is_visual.dtype == torch.bool
    assert int(batch.is_visual.sum()) == TOKENS_PER_TILE * batch.num_tiles
    if batch.num_tiles:
        assert batch.pixel_values.shape[0] == batch.num_tiles == batch.image_flags.sum()
    for start, end in zip(bounds, bounds[1:]):
        positions = batch.positions[start:end]
        assert positions[0] == 0  # restarts per sample
        assert (positions[1:] > positions[:-1]).all()
        assert batch.labels[end - 1] == IGNORE_INDEX  # no target past a sample's end
        supervised = int((batch.labels[start:end] != IGNORE_INDEX).sum())
        weight_sum = float(batch.loss_weights[start:end].sum())
        assert weight_sum == pytest.approx(math.sqrt(supervised), rel=1e-5)  # square: x * 1/sqrt(x)
    assert all(delta in DELTA_CHOICES for delta in batch.deltas) and len(batch.deltas) == len(batch.tiles_per_image)


def _collated(packer, plans):
    return [packer.collate(plan) for plan in plans]


def test_pack_invariants(encoder):
    rng = random.Random(0)
    config = PackingConfig(max_packed_tokens=160, max_tiles=6, max_buffers=4)
    packer = Packer(config, seed=1)
    samples = [_random_sample(encoder, rng, source=str(i)) for i in range(60)]
    batches = []
    for index, sample in enumerate(samples):
        batches += _collated(packer, packer.add(sample, key=index))
    batches += _collated(packer, packer.flush())
    assert not packer.buffers and packer.truncated == packer.dropped == 0
    for batch in batches:
        _check_batch(batch, config)
    # Every sample exactly once, with its tokens and shifted labels.
    emitted = sorted(int(source) for batch in batches for source in batch.sources)
    assert emitted == list(range(60))
    assert sorted(key for batch in batches for key in batch.keys) == list(range(60))
    batch = batches[0]
    bounds = batch.cu_seqlens.tolist()
    for position, source in enumerate(batch.sources):
        sample = samples[int(source)]
        start, end = bounds[position], bounds[position + 1]
        assert torch.equal(batch.input_ids[start:end], sample.input_ids)
        assert torch.equal(batch.labels[start:end - 1], sample.labels[1:])
    # Packing is efficient: the batches are mostly full.
    assert sum(b.num_tokens for b in batches) / (len(batches) * 160) > 0.7


def test_delta_one_gives_integer_positions(encoder):
    rng = random.Random(1)
    samples = [_random_sample(encoder, rng) for _ in range(5)]
    batch = collate(samples, PackingConfig(delta=1.0, max_packed_tokens=10**4))
    for start, end in zip(batch.cu_seqlens.tolist(), batch.cu_seqlens.tolist()[1:]):
        assert torch.equal(batch.positions[start:end], torch.arange(end - start, dtype=torch.float32))
    fixed = collate(samples, PackingConfig(delta=0.25))
    assert set(fixed.deltas) <= {0.25}
    if fixed.tiles_per_image:
        visual = fixed.positions[fixed.is_visual]
        assert (visual != visual.floor()).any()  # compressed visual positions are fractional
    with pytest.raises(ValueError):
        collate(samples, PackingConfig())  # random deltas need an rng


def test_shift_labels():
    assert shift_labels(torch.tensor([-100, 5, 6, -100])).tolist() == [5, 6, -100, -100]


def test_loss_modes(encoder):
    samples = [_random_sample(encoder, random.Random(seed)) for seed in range(3)]
    for mode, per_sample in (("token", lambda x: x), ("sample", lambda x: 1.0)):
        batch = collate(samples, PackingConfig(loss_mode=mode, delta=1.0))
        bounds = batch.cu_seqlens.tolist()
        for start, end in zip(bounds, bounds[1:]):
            supervised = int((batch.labels[start:end] != IGNORE_INDEX).sum())
            assert float(batch.loss_weights[start:end].sum()) == pytest.approx(per_sample(supervised), rel=1e-5)


def test_random_deltas_seeded(encoder):
    rng = random.Random(2)
    samples = [_random_sample(encoder, rng) for _ in range(40)]
    config = PackingConfig(max_packed_tokens=200, max_tiles=8)

    def run():
        packer = Packer(config, seed=5)
        batches = _collated(packer, [b for s in samples for b in packer.add(s)] + packer.flush())
        return [(b.deltas, b.positions) for b in batches]

    first, second = run(), run()
    assert all(d1 == d2 and torch.equal(p1, p2) for (d1, p1), (d2, p2) in zip(first, second))
    assert len({delta for deltas, _ in first for delta in deltas}) > 3


def test_overlong_policies(encoder):
    tokenizer = encoder.tokenizer
    pixels = torch.randn(2, 3, 28, 28)
    long_sample = encoder.encode_conversation(
        [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y" * 100}], [pixels], source="f.jsonl:7"
    )
    config = PackingConfig(max_packed_tokens=64, max_tiles=4, overlong="truncate", delta=1.0)
    packer = Packer(config)
    with pytest.warns(UserWarning, match="f.jsonl:7: truncated"):
        batches = _collated(packer, packer.add(long_sample) + packer.flush())
    assert packer.truncated == 1 and len(batches) == 1 and batches[0].num_tokens == 64
    assert batches[0].tiles_per_image == [2]

    # A tile budget below the image: the image goes, and so does everything after it (no target left).
    packer = Packer(PackingConfig(max_packed_tokens=1000, max_tiles=1, delta=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert packer.add(long_sample) == [] and packer.flush() == []
    messages = [str(warning.message) for warning in caught]
    assert "truncated" in messages[0] and "no target" in messages[1]
    assert packer.truncated == packer.dropped == 1

    packer = Packer(PackingConfig(max_packed_tokens=64, max_tiles=4, overlong="drop", delta=1.0))
    with pytest.warns(UserWarning, match="f.jsonl:7: dropped"):
        assert packer.add(long_sample) == []
    assert packer.dropped == 1 and packer.flush() == []
    assert tokenizer.decode(batches[0].input_ids[:7]) == "<|im_start|>user\n<img>"


def test_dropping_every_sample_is_an_error_after_a_run_of_drops(encoder):
    """A budget no sample fits (each truncated to no target) ends in a ValueError naming the budget and the
    smallest sample dropped, instead of a caller drawing samples forever; a sample kept ends a run."""
    def sample(question, source):
        return encoder.encode_conversation([{"from": "human", "value": question}, {"from": "gpt", "value": "y"}], [], source)

    short, longer = sample("q" * 20, "f.jsonl:2"), sample("q" * 30, "f.jsonl:1")
    fits = encoder.encode_text("ok", source="g.jsonl:1")
    packer = Packer(PackingConfig(max_packed_tokens=12, max_tiles=3, max_buffers=1, delta=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # a run one drop short, then a sample kept
            for index in range(DROPPED_IN_A_ROW - 1):
                assert packer.add(longer if index % 2 else short) == []
            packer.add(fits)
        for _ in range(DROPPED_IN_A_ROW - 1):
            assert packer.add(longer) == []
        with pytest.raises(ValueError) as caught:
            packer.add(short)
    assert str(caught.value) == (f"{DROPPED_IN_A_ROW} samples in a row dropped: none fits the pack budget (data.max_packed_tokens "
                                 f"12, data.max_tiles 3); the smallest of them, f.jsonl:2, has {len(short)} tokens / 0 tiles")


def test_preference_pair_stays_together(encoder):
    pixels = torch.randn(1, 3, 28, 28)
    config = PackingConfig(max_packed_tokens=120, max_tiles=4, delta=1.0)
    packer = Packer(config)
    batches = []
    for index in range(6):
        pair = encoder.encode_preference("<image>q", "good" * (index + 1), "bad", [pixels], source=f"p:{index}")
        batches += _collated(packer, packer.add(pair, key=index))
    batches += _collated(packer, packer.flush())
    for batch in batches:
        _check_batch(batch, config)
        assert batch.roles == ["chosen", "rejected"] * (len(batch.roles) // 2)
        assert batch.sources[0::2] == batch.sources[1::2]


def test_blank_tile_for_text_only(encoder):
    text = encoder.encode_text("hello")
    batch = collate([text], PackingConfig(delta=1.0, blank_tile_size=28))
    assert batch.pixel_values.shape == (1, 3, 28, 28) and batch.image_flags.tolist() == [0]
    plain = collate([text], PackingConfig(delta=1.0))
    assert plain.pixel_values is None and plain.image_flags.numel() == 0


# ---- mixing ----


def _mixing_datasets(tmp_path, errors, seed=0):
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    for index in range(4):
        Image.new("RGB", (20 + 10 * index, 30), (index * 60, 0, 0)).save(tmp_path / "img" / f"{index}.png")
    with open(tmp_path / "text.jsonl", "w") as handle:
        for index in range(37):
            handle.write(json.dumps({"text": "words " * (1 + index % 7)}) + "\n")
    with open(tmp_path / "mm.jsonl", "w") as handle:
        for index in range(23):
            record = {"image": f"{index % 4}.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x" * (index % 5 + 1)}]}
            handle.write(("{broken" if index == 11 else json.dumps(record)) + "\n")
    with open(tmp_path / "mm2.jsonl", "w") as handle:
        for index in range(9):
            handle.write(json.dumps({"image": "1.png", "conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "y"}]}) + "\n")
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=TOKENS_PER_TILE, system_message=None)
    tiler = ImageTiler(tile_size=28, max_num=4)
    specs = [
        DatasetSpec("text", str(tmp_path / "text.jsonl")),
        DatasetSpec("mm", str(tmp_path / "mm.jsonl"), root=str(tmp_path / "img"), data_augment=True),
        DatasetSpec("mm2", str(tmp_path / "mm2.jsonl"), root=str(tmp_path / "img"), repeat_time=0.5, weight=1.0),
    ]
    return [RecordDataset(spec, encoder, tiler, errors, seed=seed) for spec in specs]


def test_mixing_ratio(tmp_path):
    stream = MixedStream(_mixing_datasets(tmp_path, DataErrors()), language_weight=1, multimodal_weight=3)
    for _ in range(1500):
        stream.next()
    fractions = stream.token_fractions()
    assert fractions["multimodal"] == pytest.approx(0.75, abs=0.02)
    # Inside the multimodal group: 'mm' weighs its epoch size (22), 'mm2' weighs 1.
    mm, mm2 = stream.dataset_tokens["mm"], stream.dataset_tokens["mm2"]
    assert mm / (mm + mm2) == pytest.approx(22 / 23, abs=0.02)
    assert stream.cursors["text"][0] >= 1  # epochs wrap around


def test_mixing_only_one_modality(tmp_path):
    datasets = _mixing_datasets(tmp_path, DataErrors())
    stream = MixedStream(datasets, language_weight=0, multimodal_weight=1)
    names = {stream.next()[0][0] for _ in range(50)}
    assert names <= {"mm", "mm2"}
    with pytest.raises(ValueError):
        MixedStream([datasets[0]], language_weight=0)
