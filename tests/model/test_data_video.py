"""Video records: a short video written by the test (PyAV), its frames sampled as transformers' InternVL
video processor samples them, one tile each, ``<video>`` replaced by ``FrameN: <image>`` lines; the data
index measures the same shape without decoding; packing gives each frame its own V2PE delta; unreadable,
missing and empty videos are skipped and counted; a bad frame count is refused."""

import json

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from model.data import (  # noqa: E402
    ConversationEncoder,
    DataErrors,
    DatasetSpec,
    ImageTiler,
    Packer,
    PackingConfig,
    RecordDataset,
    load_or_build_index,
)
from model.data.tokenizer import ByteTokenizer  # noqa: E402
from model.data.video import sample_frame_indices, video_frame_count, video_prompt  # noqa: E402

TILE = 28


def write_video(path, frames: int, size=(32, 24)):
    """A video whose frame i is a flat colour encoding i (read back to find which frames were sampled)."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    for index in range(frames):
        image = np.full((size[1], size[0], 3), (index * 12) % 256, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.fixture
def video_data(tmp_path):
    write_video(tmp_path / "clip.mp4", 20)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    records = [
        {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhere does it go?"}, {"from": "gpt", "value": "left"}]},
        {"video": "clip.mp4", "conversations": [{"from": "human", "value": "What moves?"}, {"from": "gpt", "value": "a square"}]},
        {"video": "broken.mp4", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"video": "absent.mp4", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"video": "clip.mp4", "image": "a.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"video": "clip.mp4", "question": "<video>\nWhich way?", "chosen": "left", "rejected": "right"},
    ]
    with open(tmp_path / "videos.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    spec = DatasetSpec("videos", str(tmp_path / "videos.jsonl"), root=str(tmp_path))
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=4, system_message=None)
    return spec, encoder, ImageTiler(tile_size=TILE, max_num=4)


def test_frames_are_sampled_as_transformers_samples_them():
    # transformers' InternVLVideoProcessor.sample_frames: arange(total / n / 2, total, total / n).int()
    for total, count in [(20, 8), (8, 8), (5, 8), (100, 7), (1, 3)]:
        n = min(total, count)
        expected = torch.arange(total / n / 2, total, total / n).int().tolist()
        assert sample_frame_indices(total, count) == expected
    assert video_prompt(2) == "Frame1: <image>\nFrame2: <image>"
    with pytest.raises(ValueError, match="at least 1"):
        sample_frame_indices(10, 0)


def test_a_video_record_becomes_frame_tiles_with_frame_prompts(video_data, tmp_path):
    spec, encoder, tiler = video_data
    assert video_frame_count(str(tmp_path / "clip.mp4")) == 20
    dataset = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False, video_frames=4)
    assert dataset.modality == "multimodal"
    sample = dataset.load_record(0)
    assert sample.tiles_per_image == [1, 1, 1, 1] and sample.pixel_values.shape == (4, 3, TILE, TILE)
    text = encoder.tokenizer.decode(sample.input_ids.tolist())
    assert text.startswith("<|im_start|>user\nFrame1: <img>") and "Frame4: <img>" in text and "</img>\nWhere does it go?" in text
    # The sampled frames are 2, 7, 12, 17 (grey levels 24, 84, 144, 204 before normalisation).
    mean, std = 0.485, 0.229
    levels = (sample.pixel_values[:, 0].mean(dim=(1, 2)) * std + mean) * 255
    assert torch.allclose(levels, torch.tensor([24.0, 84.0, 144.0, 204.0]), atol=6)
    # Without a placeholder the video goes before the first human turn's text, as images do.
    assert encoder.tokenizer.decode(dataset.load_record(1).input_ids.tolist()).startswith("<|im_start|>user\nFrame1: <img>")
    pair = dataset.load_record(5)
    assert pair.chosen.tiles_per_image == [1] * 4 and pair.rejected.num_tiles == 4


def test_the_index_measures_video_records_without_decoding(video_data):
    spec, encoder, tiler = video_data
    index = load_or_build_index(spec, encoder, tiler, video_frames=4)
    dataset = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False, video_frames=4)
    for record in (0, 1, 5):
        assert index.item_shape(record) == dataset.load_record(record).shape()
    reasons = {int(index.line_numbers[row]): reason for row, reason in index.reasons.items()}
    assert reasons[3].startswith("corrupt video") and reasons[4].startswith("missing video")
    assert reasons[5].startswith("malformed record: a video record")
    assert load_or_build_index(spec, encoder, tiler, video_frames=2).fingerprint != index.fingerprint


def test_bad_videos_are_skipped_and_counted(video_data):
    spec, encoder, tiler = video_data
    errors = DataErrors()
    dataset = RecordDataset(spec, encoder, tiler, errors, augment=False, shuffle=False, video_frames=4)
    items = list(dataset.iterate())
    assert len(items) == 3 and errors.total == 3
    with pytest.raises(ValueError, match="video_frames"):
        RecordDataset(spec, encoder, tiler, video_frames=0)


@pytest.mark.parametrize("record,frames", [(0, 4), (5, 8)], ids=["conversation", "preference-pair"])
def test_each_frame_gets_its_own_v2pe_delta(video_data, record, frames):
    """A conversation's 4 frames, or an MPO pair's 4 + 4 (chosen and rejected each see the video): one
    delta per frame, by which that frame's tokens advance."""
    spec, encoder, tiler = video_data
    item = RecordDataset(spec, encoder, tiler, augment=False, shuffle=False, video_frames=4).load_record(record)
    packer = Packer(PackingConfig(max_packed_tokens=4096, max_tiles=16), seed=2)
    batch = packer.collate((packer.add(item, key=0) or packer.flush())[0])
    assert len(batch.deltas) == frames and batch.num_tiles == frames and batch.tiles_per_image == [1] * frames
    assert len(set(batch.deltas)) > 1  # drawn per frame
    visual = batch.positions[batch.is_visual].view(frames, 4)
    steps = (visual[:, 1:] - visual[:, :-1]).mean(dim=1)
    assert torch.allclose(steps, torch.tensor(batch.deltas))


def test_a_video_without_frames_is_a_data_error():
    from model.data import DataError

    with pytest.raises(DataError, match="no frames"):
        sample_frame_indices(0, 4)


def test_resume_mid_epoch_over_video_data_is_exact(video_data):
    """The per-rank loader over a video dataset: a resumed loader continues with the packs (frames and all)
    of the uninterrupted one, decoding nothing again on restore."""
    from model.data import MixedStream, PackDecoder, StepPlanner, build_loader

    spec, encoder, tiler = video_data
    index = load_or_build_index(spec, encoder, tiler, video_frames=3)
    packing = PackingConfig(max_packed_tokens=200, max_tiles=8, max_buffers=2)

    def loader():
        planning = RecordDataset(spec, encoder, tiler, seed=1, index=index, video_frames=3)
        planning = [planning] if planning.kind != "preference" else []
        stream = MixedStream(planning, 1, 3, DataErrors(journal=[]), shapes=True)
        decoding = RecordDataset(spec, encoder, tiler, seed=1, index=index, video_frames=3)
        return build_loader(StepPlanner(stream, Packer(packing, seed=1), 1), PackDecoder({spec.name: decoding}, packing, 1), 0, 2, False, 1)

    expected = [step for step, _ in zip(loader(), range(8))]
    first = loader()
    steps = iter(first)
    head = [next(steps) for _ in range(3)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [step for step, _ in zip(resumed, range(5))]
    for got, want in zip(head + tail, expected):
        assert [b.sources for b in got.batches] == [b.sources for b in want.batches]
        assert all(torch.equal(a.pixel_values, b.pixel_values) and a.deltas == b.deltas for a, b in zip(got.batches, want.batches))
    assert sum(step.images_decoded for step in tail) == sum(step.images_decoded for step in expected[3:]) > 0
