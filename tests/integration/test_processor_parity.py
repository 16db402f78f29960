"""Video records against transformers' InternVL processor (InternVLProcessor with its InternVLVideoProcessor,
frames read with PyAV as transformers' ``load_video(backend="pyav")`` does): for a textured video written by
the test, the same frames are chosen, the prompt's token ids are the same, and the pixel values agree up to
one 8-bit rounding step (the model's frames are resized by PIL's bicubic, InternVL's own preprocessing;
transformers' by torchvision's on tensors)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor  # noqa: E402
from transformers.video_utils import load_video  # noqa: E402

from model.data import IMAGENET_MEAN, IMAGENET_STD, ConversationEncoder, DatasetSpec, ImageTiler, RecordDataset  # noqa: E402
from model.data.tokenizer import IMAGE_TOKENS, HFTokenizer  # noqa: E402
from model.data.video import sample_frame_indices  # noqa: E402

TILE, FRAMES, TOKENS_PER_TILE = 28, 4, 4
QUESTION = "<video>\nWhere does it go?"


def write_textured_video(path, frames: int, size=(64, 48)):
    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    yy, xx = np.mgrid[0: size[1], 0: size[0]]
    for index in range(frames):
        image = np.stack([(xx * 4 + index * 10) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def write_tokenizer(folder):
    """A byte-level tokenizer with InternVL's special tokens, as a Hugging Face tokenizer folder both sides load."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS, "<video>"]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    start, end, context = IMAGE_TOKENS
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "extra_special_tokens": {"start_image_token": start, "end_image_token": end,
                                            "context_image_token": context, "video_token": "<video>"}}, handle)


def test_video_records_match_transformers_internvl_processor(tmp_path):
    write_textured_video(tmp_path / "clip.mp4", 20)
    write_tokenizer(tmp_path / "tokenizer")
    video_processor = InternVLVideoProcessor(size={"height": TILE, "width": TILE}, image_mean=list(IMAGENET_MEAN),
                                             image_std=list(IMAGENET_STD), do_sample_frames=True, num_frames=FRAMES)
    image_processor = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, image_mean=list(IMAGENET_MEAN),
                                            image_std=list(IMAGENET_STD), crop_to_patches=True)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
                                  video_processor=video_processor, image_seq_length=TOKENS_PER_TILE)
    frames, metadata = load_video(str(tmp_path / "clip.mp4"), backend="pyav")
    theirs = processor(text=QUESTION, videos=[frames], video_metadata=[metadata], return_tensors="pt")

    with open(tmp_path / "videos.jsonl", "w") as handle:
        handle.write(json.dumps({"video": "clip.mp4", "conversations": [{"from": "human", "value": QUESTION},
                                                                         {"from": "gpt", "value": "left"}]}) + "\n")
    tokenizer = HFTokenizer(str(tmp_path / "tokenizer"))
    encoder = ConversationEncoder(tokenizer, num_image_token=TOKENS_PER_TILE, system_message=None)
    dataset = RecordDataset(DatasetSpec("videos", str(tmp_path / "videos.jsonl"), root=str(tmp_path)), encoder,
                            ImageTiler(tile_size=TILE), augment=False, shuffle=False, video_frames=FRAMES)
    ours = dataset.load_record(0)

    # The frames chosen.
    assert sample_frame_indices(metadata.total_num_frames, FRAMES) == video_processor.sample_frames(metadata, num_frames=FRAMES).tolist()
    # The prompt: the user turn's content (between "<|im_start|>user\n" and "<|im_end|>") is the processor's ids.
    ids = ours.input_ids.tolist()
    start = len(tokenizer.encode("<|im_start|>user\n"))
    content = ids[start: ids.index(tokenizer.im_end_id)]
    assert content == theirs["input_ids"][0].tolist()
    # The pixels: the same frames, one tile each, within one 8-bit step.
    assert ours.pixel_values.shape == theirs["pixel_values"].shape == (FRAMES, 3, TILE, TILE)
    difference = (ours.pixel_values - theirs["pixel_values"]).abs()
    assert float(difference.max()) <= 1.01 / 255 / min(IMAGENET_STD)
    assert float(difference.mean()) < 1e-3


def write_textured_image(path, width: int, height: int, seed: int):
    """Smooth gradients (sharp edges make bicubic implementations differ by more than rounding)."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy + 20 * seed) * 255 / (width + height + 40)], -1).astype(np.uint8)
    from PIL import Image

    Image.fromarray(image).save(path)


def test_multi_image_records_match_transformers_internvl_processor(tmp_path):
    """Two images of a sample: each tiled with the shared budget (max_num // 2, InternVL's rule) gives the
    processor's grids and thumbnails at that max_patches, its prompt ids and its pixels (images larger than
    their tiles: both resizes shrink, within one 8-bit step; PIL and torchvision upscale differently)."""
    from PIL import Image

    write_tokenizer(tmp_path / "tokenizer")
    sizes = [(150, 70), (60, 160)]
    for index, (width, height) in enumerate(sizes):
        write_textured_image(tmp_path / f"{index}.png", width, height, index)
    question = "<image>\n<image>\nWhat differs?"
    max_num = 8
    image_processor = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, image_mean=list(IMAGENET_MEAN),
                                            image_std=list(IMAGENET_STD), crop_to_patches=True, min_patches=1,
                                            max_patches=max_num // len(sizes))
    video_processor = InternVLVideoProcessor(size={"height": TILE, "width": TILE})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
                                  video_processor=video_processor, image_seq_length=TOKENS_PER_TILE)
    images = [Image.open(tmp_path / f"{index}.png").convert("RGB") for index in range(len(sizes))]
    # The processor's image placeholder is its context token; the records' is InternVL's <image>.
    theirs = processor(text=question.replace("<image>", IMAGE_TOKENS[2]), images=images, return_tensors="pt")

    with open(tmp_path / "pairs.jsonl", "w") as handle:
        handle.write(json.dumps({"image": ["0.png", "1.png"], "conversations": [{"from": "human", "value": question},
                                                                               {"from": "gpt", "value": "the shape"}]}) + "\n")
    tokenizer = HFTokenizer(str(tmp_path / "tokenizer"))
    encoder = ConversationEncoder(tokenizer, num_image_token=TOKENS_PER_TILE, system_message=None)
    dataset = RecordDataset(DatasetSpec("pairs", str(tmp_path / "pairs.jsonl"), root=str(tmp_path)), encoder,
                            ImageTiler(tile_size=TILE, max_num=max_num), augment=False, shuffle=False)
    ours = dataset.load_record(0)

    # 150x70 with at most 4 tiles: a 2x1 grid + thumbnail; 60x160: 1x3 + thumbnail (the processor's too:
    # its ids and pixels below hold as many tiles).
    assert ours.tiles_per_image == [3, 4]
    ids = ours.input_ids.tolist()
    start = len(tokenizer.encode("<|im_start|>user\n"))
    assert ids[start: ids.index(tokenizer.im_end_id)] == theirs["input_ids"][0].tolist()
    assert ours.pixel_values.shape == theirs["pixel_values"].shape
    difference = (ours.pixel_values - theirs["pixel_values"]).abs()
    assert float(difference.max()) <= 1.01 / 255 / min(IMAGENET_STD)
