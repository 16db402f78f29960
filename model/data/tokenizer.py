"""Tokenizers: an embedded byte-level one (nothing downloaded) and a loader for a local Hugging Face
tokenizer folder, both with InternVL3's special tokens and Qwen2.5's chat template.

Special tokens are matched in text by both tokenizers (as Hugging Face tokenizers do): a record whose
text contains the image tokens' strings is rejected upstream (conversation.py), because it would break
the count of visual tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"  # Qwen2.5's end of document and padding token

IMAGE_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
CHAT_TOKENS = (IM_START_TOKEN, IM_END_TOKEN)
# In Qwen2.5's vocabulary the image tokens are added after the last existing token, giving <img> 151665,
# </img> 151666 and <IMG_CONTEXT> 151667; other vocabularies get whatever ids come next.
SPECIAL_TOKENS = (ENDOFTEXT_TOKEN,) + CHAT_TOKENS + IMAGE_TOKENS

# InternVL2.5/3's system message (the `internvl2_5` template).
INTERNVL3_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
CHAT_ROLES = ("system", "user", "assistant")


def chat_turn(role: str, content: str) -> str:
    """One turn of Qwen2.5's chat template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
    if role not in CHAT_ROLES:
        raise ValueError(f"role must be one of {CHAT_ROLES}, got {role!r}")
    return f"{IM_START_TOKEN}{role}\n{content}{IM_END_TOKEN}\n"


def format_chat(messages: Sequence[tuple[str, str]], system: Optional[str] = None, add_generation_prompt: bool = False) -> str:
    """Qwen2.5's chat template written out:
    ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{..}<|im_end|>\\n<|im_start|>assistant\\n{..}<|im_end|>\\n``.
    ``messages`` are (role, content) pairs with role 'user' or 'assistant'; ``system`` None omits the
    system turn; ``add_generation_prompt`` ends with ``<|im_start|>assistant\\n`` for generation."""
    text = "" if system is None else chat_turn("system", system)
    text += "".join(chat_turn(role, content) for role, content in messages)
    if add_generation_prompt:
        text += f"{IM_START_TOKEN}assistant\n"
    return text


class Tokenizer:
    """What the data pipeline and the model need from a tokenizer: encode/decode, the vocabulary size,
    and the ids of the special tokens (looked up, never assumed)."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Text that changes whenever the tokenization could (keys the data index's cache)."""
        raise NotImplementedError

    def special_id(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise KeyError(f"the tokenizer has no {token!r} token")
        return token_id

    @property
    def img_start_id(self) -> int:
        return self.special_id(IMG_START_TOKEN)

    @property
    def img_end_id(self) -> int:
        return self.special_id(IMG_END_TOKEN)

    @property
    def img_context_id(self) -> int:
        return self.special_id(IMG_CONTEXT_TOKEN)

    @property
    def im_start_id(self) -> int:
        return self.special_id(IM_START_TOKEN)

    @property
    def im_end_id(self) -> int:
        return self.special_id(IM_END_TOKEN)

    @property
    def eos_id(self) -> int:
        """End of a plain-text document (appended to text-only pre-training samples)."""
        return self.special_id(ENDOFTEXT_TOKEN)

    @property
    def pad_id(self) -> int:
        return self.eos_id

    def special_ids(self) -> dict[str, int]:
        return {token: self.special_id(token) for token in SPECIAL_TOKENS}


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then one id per special token
    (<|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, <img> 259, </img> 260, <IMG_CONTEXT> 261).
    A compact vocabulary (262) for the tiny model; any text round-trips."""

    def __init__(self):
        self._special_to_id = {token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {index: token for token, index in self._special_to_id.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def fingerprint(self) -> str:
        return "bytes:" + ",".join(SPECIAL_TOKENS)

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._special_to_id:
            return self._special_to_id[token]
        encoded = token.encode("utf-8")
        return encoded[0] if len(encoded) == 1 else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        while start < len(text):
            # The earliest special token at or after `start` (the longest on a shared start).
            found_at, found = len(text), None
            for token in SPECIAL_TOKENS:
                at = text.find(token, start)
                if at != -1 and (at < found_at or (at == found_at and len(token) > len(found))):
                    found_at, found = at, token
            ids.extend(text[start:found_at].encode("utf-8"))
            if found is None:
                break
            ids.append(self._special_to_id[found])
            start = found_at + len(found)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        pieces: list[str] = []
        pending = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < 256:
                pending.append(token_id)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if token_id not in self._id_to_special:
                raise ValueError(f"token id {token_id} is outside the byte tokenizer's vocabulary ({self.vocab_size})")
            if not skip_special:
                pieces.append(self._id_to_special[token_id])
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder (its ``tokenizer.json``, read with the ``tokenizers`` library).

    InternVL3's image tokens and the chat tokens are added as special tokens when the vocabulary lacks
    them (image tokens first, in the order <img>, </img>, <IMG_CONTEXT>: Qwen2.5's vocabulary then gives
    them 151665..151667, as InternVL3's checkpoints have), and <|endoftext|> too when missing. Every
    special id is looked up in the resulting vocabulary.
    """

    def __init__(self, folder: str):
        try:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as error:  # the byte tokenizer works without it
            raise ImportError("loading a Hugging Face tokenizer folder needs the 'tokenizers' package") from error
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in tokenizer folder {folder!r}")
        self.folder = folder
        self._tokenizer = RustTokenizer.from_file(path)
        for token in IMAGE_TOKENS + CHAT_TOKENS + (ENDOFTEXT_TOKEN,):
            if self._tokenizer.token_to_id(token) is None:
                self._tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self._pad_token = self._configured_pad_token(folder)

    def _configured_pad_token(self, folder: str) -> str:
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                pad = json.load(handle).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str) and self._tokenizer.token_to_id(pad) is not None:
                return pad
        return ENDOFTEXT_TOKEN

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tokenizer.token_to_id(token)

    @property
    def pad_id(self) -> int:
        return self.special_id(self._pad_token)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def fingerprint(self) -> str:
        return "hf:" + hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def load_tokenizer(folder: Optional[str] = None) -> Tokenizer:
    """The tokenizer of a local Hugging Face folder, or the embedded byte tokenizer when ``folder`` is None."""
    return ByteTokenizer() if folder is None else HFTokenizer(folder)
