"""Tokenizers (embedded byte-level, local Hugging Face folder), the chat template, and conversation encoding."""

import json

import pytest
import torch

from model.data.conversation import IGNORE_INDEX, ConversationEncoder, DataError, num_image_tokens
from model.data.tokenizer import (
    INTERNVL3_SYSTEM_MESSAGE,
    ByteTokenizer,
    HFTokenizer,
    chat_turn,
    format_chat,
    load_tokenizer,
)


def test_byte_tokenizer_round_trip_and_specials():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 262
    text = "<|im_start|>user\nhé 書<img><IMG_CONTEXT></img><|im_end|>\n<|endoftext|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.im_start_id == 257
    assert tokenizer.special_ids() == {
        "<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<img>": 259, "</img>": 260, "<IMG_CONTEXT>": 261
    }
    assert tokenizer.encode("é") == [0xC3, 0xA9]
    assert tokenizer.decode(ids, skip_special=True) == "user\nhé 書\n"
    assert tokenizer.pad_id == tokenizer.eos_id == 256
    assert tokenizer.token_to_id("a") == 97 and tokenizer.token_to_id("ab") is None
    with pytest.raises(ValueError):
        tokenizer.decode([999])


def test_chat_template():
    text = format_chat([("user", "hi"), ("assistant", "hello")], system="sys")
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert format_chat([("user", "q")], add_generation_prompt=True) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError):
        chat_turn("bot", "x")


def _write_word_level(folder, vocab, specials=()):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.save(str(folder / "tokenizer.json"))


def test_hf_folder_adds_missing_special_tokens(tmp_path):
    pytest.importorskip("tokenizers")
    _write_word_level(tmp_path, {"[UNK]": 0, "hello": 1, "world": 2})
    tokenizer = load_tokenizer(str(tmp_path))
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.special_ids()
    # Added in order: the image tokens, then the chat tokens, then <|endoftext|>.
    assert [ids[t] for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")] == [3, 4, 5, 6, 7, 8]
    assert tokenizer.vocab_size == 9
    encoded = tokenizer.encode("hello<img><IMG_CONTEXT></img> world")
    assert encoded == [1, 3, 5, 4, 2]
    assert tokenizer.decode(encoded, skip_special=True).split() == ["hello", "world"]


def test_hf_folder_qwen_numbering_and_pad(tmp_path):
    pytest.importorskip("tokenizers")
    # A Qwen2.5-shaped vocabulary: regular tokens up to 151642, <|endoftext|> 151643, <|im_start|> 151644,
    # <|im_end|> 151645, then more special tokens up to 151664; the image tokens then get 151665..151667.
    vocab = {f"w{i}": i for i in range(151643)}
    vocab["[UNK]"] = 0
    del vocab["w0"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)]
    for offset, token in enumerate(specials):
        vocab[token] = 151643 + offset
    _write_word_level(tmp_path, vocab, specials)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    tokenizer = HFTokenizer(str(tmp_path))
    assert (tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.img_context_id) == (151665, 151666, 151667)
    assert (tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.pad_id) == (151644, 151645, 151643)
    assert tokenizer.vocab_size == 151668


def test_hf_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        HFTokenizer(str(tmp_path))


def _supervised_text(tokenizer, sample):
    """The decoded supervised tokens, one string per contiguous run."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token  # aligned labels
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_num_image_tokens():
    assert num_image_tokens(448, 14, 0.5) == 256
    assert num_image_tokens(28, 14, 0.5) == 1
    assert num_image_tokens(56, 14, 0.5) == 4
    with pytest.raises(ValueError):
        num_image_tokens(30, 14)


def test_conversation_labels_and_template():
    tokenizer = ByteTokenizer()
    encoder = ConversationEncoder(tokenizer, num_image_token=4, system_message="S")
    turns = [
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"},
    ]
    sample = encoder.encode_conversation(turns)
    assert tokenizer.decode(sample.input_ids) == format_chat(
        [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")], system="S"
    )
    assert _supervised_text(tokenizer, sample) == ["a1<|im_end|>", "a2<|im_end|>"]
    assert sample.pixel_values is None and sample.tiles_per_image == [] and not sample.is_visual.any()
    assert sample.input_ids.dtype == torch.int64 and sample.labels.dtype == torch.int64

    system_turn = [{"from": "system", "value": "X"}] + turns[:2]
    assert tokenizer.decode(encoder.encode_conversation(system_turn).input_ids).startswith("<|im_start|>system\nX<|im_end|>\n")
    assert ConversationEncoder(tokenizer).system_message == INTERNVL3_SYSTEM_MESSAGE


def test_image_placeholders():
    tokenizer = ByteTokenizer()
    encoder = ConversationEncoder(tokenizer, num_image_token=4, system_message=None)
    two_tiles, one_tile = torch.randn(2, 3, 28, 28), torch.randn(1, 3, 28, 28)
    turns = [{"from": "human", "value": "A<image>B<image>C"}, {"from": "gpt", "value": "ok"}]
    sample = encoder.encode_conversation(turns, [two_tiles, one_tile])
    text = tokenizer.decode(sample.input_ids)
    assert text == (
        "<|im_start|>user\nA<img>" + "<IMG_CONTEXT>" * 8 + "</img>B<img>" + "<IMG_CONTEXT>" * 4 + "</img>C<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
    )
    assert sample.tiles_per_image == [2, 1] and sample.num_tiles == 3
    assert torch.equal(sample.pixel_values, torch.cat([two_tiles, one_tile]))
    assert int(sample.is_visual.sum()) == 12
    assert torch.equal(sample.is_visual, sample.input_ids == tokenizer.img_context_id)
    spans = sample.image_spans()
    assert [(sample.input_ids[start].item(), sample.input_ids[end - 1].item()) for start, end in spans] == [
        (tokenizer.img_start_id, tokenizer.img_end_id)
    ] * 2
    assert [end - start for start, end in spans] == [8 + 2, 4 + 2]
    assert (sample.labels[sample.is_visual] == IGNORE_INDEX).all()

    # Without placeholders one "<image>\n" per image goes before the first human turn's text.
    prepended = encoder.encode_conversation([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "ok"}], [one_tile, one_tile])
    assert tokenizer.decode(prepended.input_ids).startswith(
        "<|im_start|>user\n" + ("<img>" + "<IMG_CONTEXT>" * 4 + "</img>\n") * 2 + "Q<|im_end|>"
    )


@pytest.mark.parametrize(
    "turns,images,message",
    [
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], 1, "placeholders"),
        ([{"from": "human", "value": "q"}], 0, "no gpt turn"),
        ([{"from": "human", "value": "a <IMG_CONTEXT>"}, {"from": "gpt", "value": "x"}], 0, "reserved"),
        ([{"from": "robot", "value": "q"}, {"from": "gpt", "value": "x"}], 0, "'from'"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], 0, "string"),
        ([], 0, "non-empty"),
    ],
)
def test_malformed_conversations(turns, images, message):
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=1)
    with pytest.raises(DataError, match=message):
        encoder.encode_conversation(turns, [torch.zeros(1, 3, 14, 14)] * images)


def test_text_and_preference():
    tokenizer = ByteTokenizer()
    encoder = ConversationEncoder(tokenizer, num_image_token=1, system_message=None)
    text = encoder.encode_text("abc")
    assert text.input_ids.tolist() == [97, 98, 99, tokenizer.eos_id] and torch.equal(text.labels, text.input_ids)
    pixels = torch.randn(1, 3, 14, 14)
    pair = encoder.encode_preference("<image>Q", "good", "bad", [pixels], source="f:3")
    assert _supervised_text(tokenizer, pair.chosen) == ["good<|im_end|>"]
    assert _supervised_text(tokenizer, pair.rejected) == ["bad<|im_end|>"]
    assert pair.chosen.tiles_per_image == pair.rejected.tiles_per_image == [1] and pair.source == "f:3"


def test_truncated_never_splits_an_image():
    tokenizer = ByteTokenizer()
    encoder = ConversationEncoder(tokenizer, num_image_token=4, system_message=None)
    pixels = torch.randn(1, 3, 28, 28)
    sample = encoder.encode_conversation([{"from": "human", "value": "<image>x<image>"}, {"from": "gpt", "value": "answer"}], [pixels, pixels])
    (first_start, first_end), (second_start, second_end) = sample.image_spans()
    assert tokenizer.decode(sample.input_ids[first_start:first_end]) == "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    cut = sample.truncated(second_start + 3, 10)  # inside the second image
    assert len(cut) == second_start and cut.tiles_per_image == [1] and cut.pixel_values.shape[0] == 1
    assert sample.truncated(10**6, 1).tiles_per_image == [1]  # tile budget
    full = sample.truncated(10**6, 10)
    assert torch.equal(full.input_ids, sample.input_ids) and full.tiles_per_image == [1, 1]
