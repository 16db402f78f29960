"""InternVL records -> token ids, labels and image tiles in Qwen2.5's chat template.

Label convention here: ``Sample.labels`` is aligned with ``input_ids`` (labels[t] = input_ids[t] where
token t is supervised, -100 elsewhere). The shift to next-token targets happens once, in packing.py
(``shift_labels``), so a PackedBatch's labels[t] is the target of position t.

Supervised tokens: the content of each gpt turn and its closing <|im_end|>; everything else (system,
user turns, the ``<|im_start|>assistant\\n`` prefix, the newline after <|im_end|>, image tokens) is -100.
An image of T tiles becomes ``<img>`` + num_image_token*T ``<IMG_CONTEXT>`` + ``</img>``; only the
<IMG_CONTEXT> tokens are visual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .tokenizer import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKENS, INTERNVL3_SYSTEM_MESSAGE, Tokenizer

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLE_OF_SPEAKER = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A record that cannot become a sample (malformed, unreadable image, ...); the loader skips it."""


def num_image_tokens(tile_size: int = 448, patch_size: int = 14, downsample_ratio: float = 0.5) -> int:
    """<IMG_CONTEXT> tokens per tile: (tile/patch)^2 patches, pixel-unshuffled by downsample_ratio in each
    direction: (448/14 * 0.5)^2 = 256 for InternVL3."""
    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} must be a multiple of patch_size {patch_size}")
    side = tile_size // patch_size * downsample_ratio
    if side != int(side) or side < 1:
        raise ValueError(f"(tile_size/patch_size)*downsample_ratio must be a positive integer, got {side}")
    return int(side) ** 2


@dataclass
class Sample:
    """One training sequence: ``input_ids`` int64 [L], ``labels`` int64 [L] aligned with input_ids,
    ``is_visual`` bool [L] (the <IMG_CONTEXT> tokens), ``pixel_values`` float32 [tiles, 3, H, W] or None,
    ``tiles_per_image`` (one entry per image, in order), ``source`` ('file:line' for reports)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    is_visual: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    tiles_per_image: list[int] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)

    @property
    def num_images(self) -> int:
        return len(self.tiles_per_image)

    def image_spans(self) -> list[tuple[int, int]]:
        """[start, end) of each image's tokens, <img> and </img> included, in order."""
        visual = self.is_visual.to(torch.int8)
        edges = torch.diff(visual, prepend=visual.new_zeros(1), append=visual.new_zeros(1))
        starts = torch.nonzero(edges == 1).flatten().tolist()
        ends = torch.nonzero(edges == -1).flatten().tolist()
        return [(start - 1, end + 1) for start, end in zip(starts, ends)]

    def truncated(self, max_tokens: int, max_tiles: int) -> "Sample":
        """The longest prefix with at most max_tokens tokens and max_tiles tiles that cuts no image (see
        truncation_cut)."""
        cut, kept_images = truncation_cut(len(self), self.image_spans(), self.tiles_per_image, max_tokens, max_tiles)
        tiles = sum(self.tiles_per_image[:kept_images])
        pixel_values = self.pixel_values[:tiles] if self.pixel_values is not None and tiles > 0 else None
        return Sample(
            self.input_ids[:cut], self.labels[:cut], self.is_visual[:cut], pixel_values, self.tiles_per_image[:kept_images], self.source
        )

    def has_target(self) -> bool:
        """Whether some token after the first is supervised (a next-token target exists)."""
        return bool((self.labels[1:] != IGNORE_INDEX).any())

    def shape(self) -> "SampleShape":
        """What packing needs to know of this sample, without its tokens and pixels."""
        supervised = torch.nonzero(self.labels[1:] != IGNORE_INDEX).flatten()
        first_target = int(supervised[0]) + 1 if supervised.numel() else -1
        return SampleShape(len(self), first_target, self.image_spans(), list(self.tiles_per_image), self.source)


def truncation_cut(length: int, spans, tiles_per_image, max_tokens: int, max_tiles: int) -> tuple[int, int]:
    """(tokens kept, images kept) of a sample of ``length`` tokens whose images occupy ``spans`` ([start, end)
    with <img> and </img>) and have ``tiles_per_image`` tiles, cut to at most max_tokens tokens and max_tiles
    tiles without cutting an image: the cut moves back to the start of the first image that does not fit whole."""
    cut = min(length, max_tokens)
    kept_images = 0
    tiles = 0
    for (start, end), image_tiles in zip(spans, tiles_per_image):
        if end > cut or tiles + image_tiles > max_tiles:
            cut = min(cut, start)
            break
        kept_images += 1
        tiles += image_tiles
    return cut, kept_images


@dataclass
class SampleShape:
    """A Sample's size without its tokens and pixels (from the data index): ``length`` tokens, the first
    supervised position after the first token (-1: none), each image's token span and tiles. Packing plans
    on shapes; the ranks then decode only the samples of their own packs."""

    length: int
    first_target: int
    spans: list = field(default_factory=list)
    tiles_per_image: list = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return self.length

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)

    def truncated(self, max_tokens: int, max_tiles: int) -> "SampleShape":
        cut, kept_images = truncation_cut(self.length, self.spans, self.tiles_per_image, max_tokens, max_tiles)
        first_target = self.first_target if 0 < self.first_target < cut else -1
        return SampleShape(cut, first_target, self.spans[:kept_images], self.tiles_per_image[:kept_images], self.source)

    def has_target(self) -> bool:
        return self.first_target > 0


@dataclass
class PreferencePair:
    """An MPO pair: the same prompt (and images) answered by ``chosen`` and by ``rejected``; packed together.
    ``reference``: the reference model's summed log-probabilities of (chosen, rejected) when the record
    carries them (``ref_chosen_logp``, ``ref_rejected_logp``), else None."""

    chosen: Sample
    rejected: Sample
    source: str = ""
    reference: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def num_tiles(self) -> int:
        return self.chosen.num_tiles + self.rejected.num_tiles

    def shape(self) -> "PreferencePair":
        return PreferencePair(self.chosen.shape(), self.rejected.shape(), self.source, self.reference)


class ConversationEncoder:
    """Turns InternVL conversations into Samples with a tokenizer.

    ``num_image_token``: <IMG_CONTEXT> tokens per tile (256 for 448-pixel tiles, see num_image_tokens).
    ``system_message``: the system turn (InternVL3's by default; None for no system turn); a conversation
    whose first turn is from 'system' replaces it.
    """

    def __init__(self, tokenizer: Tokenizer, num_image_token: int = 256, system_message: Optional[str] = INTERNVL3_SYSTEM_MESSAGE):
        if num_image_token < 1:
            raise ValueError(f"num_image_token must be positive, got {num_image_token}")
        self.tokenizer = tokenizer
        self.num_image_token = num_image_token
        self.system_message = system_message
        self._img_start = tokenizer.img_start_id
        self._img_end = tokenizer.img_end_id
        self._img_context = tokenizer.img_context_id

    def _check_text(self, text, what: str) -> str:
        if not isinstance(text, str):
            raise DataError(f"{what} must be a string, got {type(text).__name__}")
        for token in IMAGE_TOKENS:
            if token in text:
                raise DataError(f"{what} contains the reserved token {token!r}")
        return text

    def _encode_with_images(self, text: str, image_tiles: list[int], next_image: list[int]):
        """Token ids of ``text`` with each <image> replaced by the next image's tokens; returns (ids, visual)."""
        ids: list[int] = []
        visual: list[bool] = []
        for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index > 0:
                tiles = image_tiles[next_image[0]]
                next_image[0] += 1
                context = self.num_image_token * tiles
                ids += [self._img_start] + [self._img_context] * context + [self._img_end]
                visual += [False] + [True] * context + [False]
            if piece:
                piece_ids = self.tokenizer.encode(piece)
                ids += piece_ids
                visual += [False] * len(piece_ids)
        return ids, visual

    def encode_conversation(
        self, conversations, pixel_values: Sequence[torch.Tensor] = (), source: str = "", tiles_per_image: Optional[Sequence[int]] = None
    ) -> Sample:
        """A Sample from InternVL turns ([{'from': 'human'|'gpt', 'value': str}, ...]) and one pixel tensor
        [tiles, 3, H, W] per image, in order of the <image> placeholders. Without placeholders, one
        ``<image>\\n`` per image is prepended to the first human turn (InternVL's rule).
        ``tiles_per_image`` instead of pixel_values: the tokens only (a Sample without pixels), as the data
        index measures samples without decoding their images."""
        if tiles_per_image is not None and pixel_values:
            raise ValueError("give pixel_values or tiles_per_image, not both")
        image_tiles = [int(tiles) for tiles in tiles_per_image] if tiles_per_image is not None else [int(p.shape[0]) for p in pixel_values]
        if not isinstance(conversations, list) or not conversations:
            raise DataError("'conversations' must be a non-empty list of turns")
        turns = []
        for index, turn in enumerate(conversations):
            if not isinstance(turn, dict) or turn.get("from") not in ROLE_OF_SPEAKER:
                raise DataError(f"turn {index} must be a dict with 'from' in {sorted(ROLE_OF_SPEAKER)}")
            turns.append([ROLE_OF_SPEAKER[turn["from"]], self._check_text(turn.get("value"), f"turn {index} 'value'")])
        system = self.system_message
        if turns[0][0] == "system":
            system = turns.pop(0)[1]
        if any(role == "system" for role, _ in turns):
            raise DataError("a 'system' turn may only come first")
        if not any(role == "assistant" for role, _ in turns):
            raise DataError("the conversation has no gpt turn (nothing to learn)")

        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if placeholders == 0 and image_tiles:
            first_user = next((turn for turn in turns if turn[0] == "user"), None)
            if first_user is None:
                raise DataError("images given but the conversation has no human turn to hold them")
            first_user[1] = f"{IMAGE_PLACEHOLDER}\n" * len(image_tiles) + first_user[1]
        elif placeholders != len(image_tiles):
            raise DataError(f"{placeholders} <image> placeholders for {len(image_tiles)} images")

        next_image = [0]
        ids: list[int] = []
        labels: list[int] = []
        visual: list[bool] = []

        def add(piece_ids, piece_visual=None, supervised=False):
            ids.extend(piece_ids)
            labels.extend(piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids))
            visual.extend(piece_visual if piece_visual is not None else [False] * len(piece_ids))

        encode = self.tokenizer.encode
        if system is not None:
            add(encode(f"{IM_START_TOKEN}system\n{system}{IM_END_TOKEN}\n"))
        for role, text in turns:
            add(encode(f"{IM_START_TOKEN}{role}\n"))
            content_ids, content_visual = self._encode_with_images(text, image_tiles, next_image)
            if role == "assistant":
                # Image tokens are never targets, even inside a gpt turn.
                ids.extend(content_ids)
                labels.extend(IGNORE_INDEX if is_visual_token or token in (self._img_start, self._img_end) else token
                              for token, is_visual_token in zip(content_ids, content_visual))
                visual.extend(content_visual)
                add(encode(IM_END_TOKEN), supervised=True)
                add(encode("\n"))
            else:
                add(content_ids, content_visual)
                add(encode(f"{IM_END_TOKEN}\n"))
        pixels = torch.cat(list(pixel_values)) if pixel_values else None
        return Sample(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(labels, dtype=torch.int64),
            torch.tensor(visual, dtype=torch.bool),
            pixels,
            image_tiles,
            source,
        )

    def encode_text(self, text, source: str = "") -> Sample:
        """A plain-text pre-training sample: the text's tokens then <|endoftext|>, all supervised."""
        text = self._check_text(text, "'text'")
        if IMAGE_PLACEHOLDER in text:
            raise DataError("a text-only record contains an <image> placeholder")
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        return Sample(input_ids, input_ids.clone(), torch.zeros(len(ids), dtype=torch.bool), None, [], source)

    def encode_preference(
        self, prompt, chosen, rejected, pixel_values: Sequence[torch.Tensor] = (), source: str = "", tiles_per_image: Optional[Sequence[int]] = None
    ) -> PreferencePair:
        """An MPO pair: the conversation (human: prompt, gpt: chosen) and (human: prompt, gpt: rejected)
        (``tiles_per_image``: as for encode_conversation)."""
        pair = []
        for response in (chosen, rejected):
            conversation = [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]
            pair.append(self.encode_conversation(conversation, pixel_values, source, tiles_per_image))
        return PreferencePair(pair[0], pair[1], source)
