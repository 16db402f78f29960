"""Video records: a short video written by the test (PyAV), its frames sampled as transformers' InternVL
video processor samples them, one tile each, ``<video>`` replaced by ``FrameN: <image>`` lines; the data
index measures the same shape without decoding; packing gives each frame its own V2PE delta; unreadable,
missing and empty videos are skipped and counted; a bad frame count is refused."""

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from model.data import (  # noqa: E402
    ConversationEncoder,
    DataErrors,
    DatasetSpec,
    FrameSampling,
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


def video_dataset(folder, name: str, records: list):
    """(spec, encoder, tiler) of the dataset ``name`` holding ``records``, written to ``folder``."""
    with open(folder / f"{name}.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    spec = DatasetSpec(name, str(folder / f"{name}.jsonl"), root=str(folder))
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=4, system_message=None)
    return spec, encoder, ImageTiler(tile_size=TILE, max_num=4)


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
    return video_dataset(tmp_path, "videos", records)


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
    with pytest.raises(TypeError, match="video_frames"):
        RecordDataset(spec, encoder, tiler, video_frames="8")


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


@pytest.mark.parametrize("sampling", [3, FrameSampling(1, 5, "random")], ids=["fixed", "drawn"])
def test_resume_mid_epoch_over_video_data_is_exact(video_data, sampling):
    """The per-rank loader over a video dataset: a resumed loader continues with the packs (frames and all)
    of the uninterrupted one, decoding nothing again on restore; with drawn frame counts and offsets the
    planner's shapes (from the index) are those of the decoded samples (no record is reported changed)."""
    from model.data import MixedStream, PackDecoder, StepPlanner, build_loader

    spec, encoder, tiler = video_data
    index = load_or_build_index(spec, encoder, tiler, video_frames=sampling)
    packing = PackingConfig(max_packed_tokens=200, max_tiles=8, max_buffers=2)

    def loader():
        planning = RecordDataset(spec, encoder, tiler, seed=1, index=index, video_frames=sampling)
        planning = [planning] if planning.kind != "preference" else []
        stream = MixedStream(planning, 1, 3, DataErrors(journal=[]), shapes=True)
        decoding = RecordDataset(spec, encoder, tiler, seed=1, index=index, video_frames=sampling)
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
    assert not [error for step in expected for error in step.decode_errors]
    counts = {len(tiles) for step in expected for batch in step.batches for tiles in [batch.tiles_per_image] if tiles}
    assert len(counts) > 1 if isinstance(sampling, FrameSampling) else counts <= {3, 6, 9}


def test_frame_sampling_draws_a_count_between_its_bounds_and_a_frame_in_each_segment():
    import random

    middle = FrameSampling(3, 3)
    assert middle == FrameSampling.fixed(3) and middle.indices(20, random.Random(0)) == sample_frame_indices(20, 3)
    drawn = FrameSampling(2, 6, "random")
    assert drawn.indices(20) == sample_frame_indices(20, 2)  # no generator: the least count at the middles
    counts = set()
    for seed in range(200):
        indices = drawn.indices(20, random.Random(seed))
        count = len(indices)
        counts.add(count)
        bounds = [segment * 20 // count for segment in range(count + 1)]
        assert all(start <= index < end for index, start, end in zip(indices, bounds, bounds[1:]))
    assert counts == {2, 3, 4, 5, 6}
    assert {len(drawn.indices(4, random.Random(seed))) for seed in range(50)} == {2, 3, 4}  # never more than the video has
    assert len({tuple(drawn.indices(100, random.Random(seed))) for seed in range(20)}) == 20


@pytest.mark.parametrize("settings,message", [((0, 4), "min_frames"), ((5, 4), "max_frames"), ((2, 4, "uniform"), "offsets"),
                                              ((2.5, 4), "min_frames")])
def test_bad_frame_bounds_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        FrameSampling(*settings)


def test_the_training_config_checks_its_frame_bounds():
    from model.train.config import DataConfig

    assert DataConfig(video_frames=6, video_min_frames=2, video_frame_offsets="random").frame_sampling() == FrameSampling(2, 6, "random")
    assert DataConfig(video_frames=6).frame_sampling() == FrameSampling.fixed(6)
    for settings, name in [({"video_min_frames": 0}, "data.video_min_frames"), ({"video_min_frames": 9}, "data.video_min_frames"),
                           ({"video_frames": 0}, "data.video_frames"), ({"video_frame_offsets": "rand"}, "data.video_frame_offsets")]:
        with pytest.raises(ValueError, match=name):
            DataConfig(**settings)


@pytest.fixture
def drawn_videos(tmp_path):
    """Video records whose shapes the index grows: text before and after the video, the video in a later
    human turn (the first target comes before it), a preference pair, and a video shorter than the bounds."""
    write_video(tmp_path / "clip.mp4", 20)
    write_video(tmp_path / "short.mp4", 3)
    records = [
        {"video": "clip.mp4", "conversations": [{"from": "human", "value": "Look: <video>\nWhere does it go?"}, {"from": "gpt", "value": "left"}]},
        {"video": "clip.mp4", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                                {"from": "human", "value": "<video> and?"}, {"from": "gpt", "value": "up"}]},
        {"video": "short.mp4", "conversations": [{"from": "human", "value": "Which way?"}, {"from": "gpt", "value": "down"}]},
        {"video": "clip.mp4", "question": "<video>\nWhich way?", "chosen": "left", "rejected": "right"},
    ]
    return video_dataset(tmp_path, "drawn", records)


def test_drawn_frames_give_the_shape_the_index_predicts_and_the_frames_they_name(drawn_videos, monkeypatch):
    """For every (epoch, position), the shape planned from the index (measured with the least count, grown to
    the drawn one) equals the decoded sample's, and the decoded tiles are the drawn frames: one from each of
    the count's equal segments of the video."""
    spec, encoder, tiler = drawn_videos
    sampling = FrameSampling(2, 12, "random")
    index = load_or_build_index(spec, encoder, tiler, video_frames=sampling)
    assert [index.video_total(record) for record in range(4)] == [20, 20, 3, 20]
    dataset = RecordDataset(spec, encoder, tiler, seed=3, index=index, video_frames=sampling)
    counts = set()
    mean, std = 0.485, 0.229
    for epoch in range(16):
        for position in range(len(dataset)):
            item, shape = dataset.get(epoch, position), dataset.get_shape(epoch, position)
            assert item.shape() == shape
            sample = item.chosen if hasattr(item, "chosen") else item
            total = index.video_total(dataset.epoch_order(epoch)[position])
            count = sample.num_tiles
            counts.add(count)
            assert 2 <= count <= 12
            # frame i of the test video is grey level 12 i: the decoded level names the frame
            frames = ((sample.pixel_values[:, 0].mean(dim=(1, 2)) * std + mean) * 255 / 12).round().int().tolist()
            bounds = [segment * total // count for segment in range(count + 1)]
            assert all(start <= frame < end for frame, start, end in zip(frames, bounds, bounds[1:])), (frames, bounds)
    assert {2, 3, 11, 12} <= counts  # "Frame10: " and on are a token longer
    # Decoding takes the frame total from the index (the count the planner drew from): no container is opened to count.
    from model.data import datasets as datasets_module

    def counted(path):
        raise AssertionError(f"{path} opened to count its frames")

    monkeypatch.setattr(datasets_module, "video_frame_count", counted)
    assert all(dataset.get(0, position).shape() == dataset.get_shape(0, position) for position in range(len(dataset)))
    monkeypatch.undo()
    # The index is measured with the least count: other upper bounds and offsets share it, another least count does not.
    assert load_or_build_index(spec, encoder, tiler, video_frames=FrameSampling(2, 4)).fingerprint == index.fingerprint
    assert load_or_build_index(spec, encoder, tiler, video_frames=FrameSampling(3, 12)).fingerprint != index.fingerprint


def test_frame_indices_equal_transformers_processor_for_every_length_and_count():
    """transformers' InternVLVideoProcessor.sample_frames itself, for every total of 1..3000 frames and every
    count of 1..64 (192,000 cases, the 152-frame video in 12 among them: its frame 95 is the exact middle of
    segment 7, where floating point gave 94). Its float32 arange agrees with the exact middles up to about
    150,000 frames; beyond, it can round a middle up to the next frame."""
    pytest.importorskip("transformers")
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = InternVLVideoProcessor()
    assert sample_frame_indices(152, 12)[7] == 95
    for total in range(1, 3001):
        metadata = VideoMetadata(total_num_frames=total, fps=30)
        for count in range(1, 65):
            expected = processor.sample_frames(metadata, num_frames=min(count, total)).tolist()
            assert sample_frame_indices(total, count) == expected, (total, count)


BITS = 10  # frames of a numbered video: at most 2 ** BITS


def write_numbered_video(path, frames: int, gop: int, codec="mpeg4", pts=None):
    """A 30 fps video whose frame i shows i in binary (BITS black or white 16x16 squares), with a keyframe
    every ``gop`` frames and no others; ``pts(i)``: frame i's timestamp in 1/120 s (default: its place at 30 fps)."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream(codec, rate=30, options={"sc_threshold": "1000000000", "x264-params": "scenecut=0"} if codec == "libx264"
                                  else {"sc_threshold": "1000000000"})
    stream.width, stream.height = 16 * BITS, 16
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    if pts is not None:
        stream.codec_context.time_base = stream.time_base = Fraction(1, 120)
    for index in range(frames):
        bits = np.array([(index >> bit) & 1 for bit in range(BITS)], dtype=np.uint8) * 255
        frame = av.VideoFrame.from_ndarray(np.repeat(np.repeat(bits[None, :, None], 16, 0), 16, 1).repeat(3, 2), format="rgb24")
        if pts is not None:
            frame.pts, frame.time_base = pts(index), Fraction(1, 120)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def frame_numbers(images) -> list[int]:
    """The numbers the frames of a write_numbered_video show."""
    numbers = []
    for image in images:
        squares = np.asarray(image.convert("L"), dtype=np.float32)[4:12].reshape(8, BITS, 16)[:, :, 4:12].mean(axis=(0, 2))
        numbers.append(int(sum(1 << bit for bit in range(BITS) if squares[bit] > 128)))
    return numbers


class CountingContainer:
    """A PyAV container counting the frames it decodes and the seeks asked of it."""

    def __init__(self, container):
        self.container, self.decoded, self.seeks = container, 0, 0

    def __getattr__(self, name):
        return getattr(self.container, name)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame

    def seek(self, *args, **kwargs):
        self.seeks += 1
        return self.container.seek(*args, **kwargs)


@pytest.fixture
def opened(monkeypatch):
    """The containers load_frames opens, as CountingContainers, in order."""
    from model.data import video

    containers, open_container = [], video._open

    def counting(path):
        containers.append(CountingContainer(open_container(path)))
        return containers[-1]

    monkeypatch.setattr(video, "_open", counting)
    return containers


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_frames_of_a_long_video_are_the_ones_asked_for(tmp_path, codec, opened):
    """A 900-frame video with a keyframe every 30 frames (libx264: B-frames too): the frames load_frames returns
    are those asked for, by the number each shows, at the sampled middles, across keyframes, side by side and
    at random; reached by seeking (one container: the timestamps named the frames)."""
    import random

    from model.data.video import load_frames

    if codec not in av.codecs_available:
        pytest.skip(f"PyAV has no {codec} encoder")
    write_numbered_video(tmp_path / "long.mp4", 900, gop=30, codec=codec)
    draws = random.Random(0)
    cases = [sample_frame_indices(900, 8), sample_frame_indices(900, 64), [0], [899], [29, 30, 31, 59, 60, 61], list(range(400, 406)),
             [0, 899], sorted(draws.sample(range(900), 12)), FrameSampling(4, 16, "random").indices(900, draws)]
    for indices in cases:
        opened.clear()
        assert frame_numbers(load_frames(str(tmp_path / "long.mp4"), indices)) == indices
        assert len(opened) == 1


def test_a_long_video_is_decoded_by_seeking(tmp_path, opened):
    """8 frames of a 900-frame video with a keyframe every 30: each is reached from the keyframe before it,
    so about 8 groups of pictures are decoded, not the 844 frames up to the last one."""
    from model.data.video import load_frames

    write_numbered_video(tmp_path / "long.mp4", 900, gop=30)
    indices = sample_frame_indices(900, 8)
    assert frame_numbers(load_frames(str(tmp_path / "long.mp4"), indices)) == indices
    (container,) = opened
    assert container.seeks == 8 and container.decoded <= 1 + 8 * 30


@pytest.mark.parametrize("kind", ["variable-rate", "no-timestamps"])
def test_a_video_whose_timestamps_do_not_name_its_frames_is_decoded_in_order(tmp_path, kind, opened):
    """A variable frame rate (30 fps and 120 fps stretches by turns: the average rate's grid does not hold the
    timestamps) or a raw H.264 stream (no timestamps): load_frames decodes from the first frame in order, and
    frame n is still the n-th frame shown."""
    from model.data.video import load_frames

    if kind == "variable-rate":
        path = tmp_path / "variable.mp4"
        write_numbered_video(path, 300, gop=30, pts=lambda index: sum(4 if (i // 10) % 2 == 0 else 1 for i in range(index)))
    else:
        if "libx264" not in av.codecs_available:
            pytest.skip("PyAV has no libx264 encoder")
        path = tmp_path / "raw.h264"
        write_numbered_video(path, 300, gop=30, codec="libx264")
    indices = sample_frame_indices(300, 8)
    assert frame_numbers(load_frames(str(path), indices)) == indices
    assert len(opened) == 2 and opened[-1].decoded == indices[-1] + 1 and opened[-1].seeks == 0
