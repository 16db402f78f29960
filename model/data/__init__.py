"""The data pipeline: InternVL's formats, dynamic tiling, tokenizers, packing with V2PE and loss weights,
the resumable language/multimodal mixing stream, the data index and per-rank loading."""

from .conversation import IGNORE_INDEX, ConversationEncoder, DataError, PreferencePair, Sample, SampleShape, num_image_tokens
from .datasets import DataErrors, DatasetSpec, JsonlFile, RecordDataset, load_meta
from .index import DatasetIndex, load_or_build_index
from .loading import PackDecoder, StepData, StepPlanner, StepShare, build_loader, decoding_peer, start_loader
from .mixing import MixedStream
from .packing import DELTA_CHOICES, PackedBatch, Packer, PackingConfig, PackPlan, check_budget_fits, collate, shift_labels
from .tiling import IMAGENET_MEAN, IMAGENET_STD, ImageTiler, candidate_grids, closest_grid, image_size, load_image, tile_image
from .tokenizer import (
    INTERNVL3_SYSTEM_MESSAGE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    chat_turn,
    format_chat,
    load_tokenizer,
)
from .video import FRAME_OFFSETS, FrameSampling

__all__ = [
    "DELTA_CHOICES",
    "FRAME_OFFSETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERNVL3_SYSTEM_MESSAGE",
    "ByteTokenizer",
    "ConversationEncoder",
    "DataError",
    "DataErrors",
    "DatasetIndex",
    "DatasetSpec",
    "FrameSampling",
    "HFTokenizer",
    "ImageTiler",
    "JsonlFile",
    "MixedStream",
    "PackDecoder",
    "PackPlan",
    "PackedBatch",
    "Packer",
    "PackingConfig",
    "PreferencePair",
    "RecordDataset",
    "Sample",
    "SampleShape",
    "StepData",
    "StepPlanner",
    "StepShare",
    "Tokenizer",
    "build_loader",
    "decoding_peer",
    "start_loader",
    "candidate_grids",
    "check_budget_fits",
    "chat_turn",
    "closest_grid",
    "collate",
    "format_chat",
    "image_size",
    "load_image",
    "load_meta",
    "load_or_build_index",
    "load_tokenizer",
    "num_image_tokens",
    "shift_labels",
    "tile_image",
]
