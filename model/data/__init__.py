"""The data pipeline: InternVL's formats, dynamic tiling, tokenizers, packing with V2PE and loss weights,
and the resumable language/multimodal mixing stream."""

from .conversation import IGNORE_INDEX, ConversationEncoder, DataError, PreferencePair, Sample, num_image_tokens
from .datasets import DataErrors, DatasetSpec, JsonlFile, RecordDataset, load_meta
from .mixing import MixedStream, PackedLoader
from .packing import DELTA_CHOICES, PackedBatch, Packer, PackingConfig, collate, shift_labels
from .tiling import IMAGENET_MEAN, IMAGENET_STD, ImageTiler, candidate_grids, closest_grid, load_image, tile_image
from .tokenizer import (
    INTERNVL3_SYSTEM_MESSAGE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    chat_turn,
    format_chat,
    load_tokenizer,
)

__all__ = [
    "DELTA_CHOICES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERNVL3_SYSTEM_MESSAGE",
    "ByteTokenizer",
    "ConversationEncoder",
    "DataError",
    "DataErrors",
    "DatasetSpec",
    "HFTokenizer",
    "ImageTiler",
    "JsonlFile",
    "MixedStream",
    "PackedBatch",
    "PackedLoader",
    "Packer",
    "PackingConfig",
    "PreferencePair",
    "RecordDataset",
    "Sample",
    "Tokenizer",
    "candidate_grids",
    "chat_turn",
    "closest_grid",
    "collate",
    "format_chat",
    "load_image",
    "load_meta",
    "load_tokenizer",
    "num_image_tokens",
    "shift_labels",
    "tile_image",
]
