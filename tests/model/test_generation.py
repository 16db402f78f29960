"""Generation with the reference InternVL3 (model/generation.py): the KV cache against recomputing the whole
sequence each step (images, V2PE delta < 1, one delta per image as for several images or a video's frames), sampling options and seeded reproducibility, stop tokens,
Best-of-N, and greedy decoding equal to transformers' InternVLForConditionalGeneration.generate."""

from __future__ import annotations

import pytest
import torch

import internvl3_engine as engine
from model.config import InternVL3Config
from model.generation import GenerationOutput, generate
from model.modeling import InternVL3

TINY = InternVL3Config.preset("tiny")
IMG = TINY.image_token_id
PER_TILE = TINY.tokens_per_tile


def tiny_model() -> InternVL3:
    model = InternVL3(InternVL3Config.preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def text_ids(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,))


def image_ids(tiles: int) -> torch.Tensor:
    return torch.full((tiles * PER_TILE,), IMG)


def tiles(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 56, 56)


@torch.no_grad()
def greedy_by_recomputing(model: InternVL3, prompt: torch.Tensor, pixels, delta: float, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through the decoder at every step, V2PE positions of
    the whole sequence (generated tokens are text, whatever their id)."""
    prompt_visual = prompt == IMG
    visual_rows = model.encode_images(pixels) if pixels is not None else None
    sequence = prompt
    for _ in range(steps):
        is_visual = torch.cat([prompt_visual, prompt_visual.new_zeros(sequence.shape[0] - prompt.shape[0])])
        cu_seqlens = engine.cu_seqlens_from_lengths([sequence.shape[0]])
        positions = engine.v2pe_position_ids(is_visual, cu_seqlens, delta if isinstance(delta, float) else torch.tensor(delta))
        embeds = model.language.embed_tokens(sequence)
        if visual_rows is not None:
            embeds = engine.scatter_visual(embeds, visual_rows, is_visual)
        hidden = model.language.decode(embeds, cu_seqlens, sequence.shape[0], positions)
        sequence = torch.cat([sequence, model.language.lm_head(hidden[-1]).argmax()[None]])
    return sequence[prompt.shape[0]:]


@pytest.mark.parametrize(
    "delta, parts, n_tiles",
    [
        (0.5, lambda: [text_ids(3), image_ids(2), text_ids(4)], 2),  # image inside the prompt
        (0.25, lambda: [text_ids(2), image_ids(1), text_ids(1), image_ids(2)], 3),  # prompt ends on an image
        (1.0, lambda: [text_ids(6)], 0),
        ([0.5, 0.125, 1.0], lambda: [text_ids(2), image_ids(1), text_ids(2), image_ids(1), text_ids(1), image_ids(1), text_ids(2)], 3),
    ],
)
def test_greedy_with_cache_equals_recomputing(delta, parts, n_tiles):
    model = tiny_model()
    prompt = torch.cat(parts())
    pixels = tiles(n_tiles) if n_tiles else None
    out = generate(model, prompt, pixels, max_new_tokens=7, delta=delta)
    assert isinstance(out, GenerationOutput) and out.tokens.dtype == torch.int64 and out.tokens.shape == (7,)
    assert torch.equal(out.tokens, greedy_by_recomputing(model, prompt, pixels, delta, 7))
    assert len(out.sequences) == 1 and out.scores is None
    assert torch.equal(model.generate(prompt, pixels, max_new_tokens=7, delta=delta).tokens, out.tokens)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny_model()
    prompt = torch.cat([text_ids(2), image_ids(1), text_ids(3)])
    pixels = tiles(1)

    def sample(seed, **options):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompt, pixels, max_new_tokens=6, do_sample=True, generator=generator,
                        num_return_sequences=3, **options).sequences

    first, again, other = sample(1), sample(1), sample(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1]) or not torch.equal(first[1], first[2])  # independent candidates
    # filtered sampling: reproducible too, and top_k=1 or a tiny top_p is greedy
    options = dict(temperature=0.7, top_k=20, top_p=0.9)
    assert all(torch.equal(a, b) for a, b in zip(sample(5, **options), sample(5, **options)))
    greedy = generate(model, prompt, pixels, max_new_tokens=6).tokens
    assert all(torch.equal(s, greedy) for s in sample(3, top_k=1))
    assert all(torch.equal(s, greedy) for s in sample(4, top_p=1e-6, temperature=2.0))


def test_stop_tokens_end_a_sequence_after_the_stop_token():
    model = tiny_model()
    prompt = text_ids(5)
    full = generate(model, prompt, max_new_tokens=8).tokens
    stop = int(full[2])
    first = int((full == stop).nonzero()[0])
    stopped = generate(model, prompt, max_new_tokens=8, stop_token_ids=[stop, 1000])
    assert torch.equal(stopped.tokens, full[: first + 1])
    # sampled candidates each end at their own first stop token
    generator = torch.Generator().manual_seed(0)
    candidates = generate(model, prompt, max_new_tokens=10, do_sample=True, num_return_sequences=6, generator=generator,
                          temperature=3.0, stop_token_ids=range(0, 256, 2)).sequences
    for candidate in candidates:
        even = (candidate % 2 == 0).nonzero()
        assert len(candidate) == (int(even[0]) + 1 if len(even) else 10)
    assert generate(model, prompt, max_new_tokens=0).tokens.shape == (0,)


def test_best_of_n_returns_the_best_scored_candidate():
    model = tiny_model()
    prompt = torch.cat([text_ids(2), image_ids(1), text_ids(2)])
    pixels = tiles(1)
    calls = []

    def score(prompt_ids, candidate_ids):
        calls.append((prompt_ids, candidate_ids))
        return float(candidate_ids.float().mean())

    out = generate(model, prompt, pixels, max_new_tokens=5, do_sample=True, best_of_n=5, score_fn=score,
                   generator=torch.Generator().manual_seed(7), delta=0.5)
    assert len(calls) == 5 and all(torch.equal(p, prompt) for p, _ in calls)
    assert len(out.sequences) == 5 and out.scores == [score(prompt, c) for c in out.sequences]
    assert out.best_index == max(range(5), key=lambda i: out.scores[i])
    assert torch.equal(out.tokens, out.sequences[out.best_index])
    # the candidates are the sampled ones: the same draws as num_return_sequences=5 with the same seed
    plain = generate(model, prompt, pixels, max_new_tokens=5, do_sample=True, num_return_sequences=5,
                     generator=torch.Generator().manual_seed(7), delta=0.5)
    assert all(torch.equal(a, b) for a, b in zip(out.sequences, plain.sequences))
    # ties go to the first candidate
    assert generate(model, prompt, pixels, max_new_tokens=3, do_sample=True, best_of_n=3,
                    score_fn=lambda p, c: 1.0).best_index == 0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, p: generate(m, p[None], max_new_tokens=2), ValueError, "1-D"),
        (lambda m, p: generate(m, p.float(), max_new_tokens=2), TypeError, "input_ids"),
        (lambda m, p: generate(m, p, max_new_tokens=-1), ValueError, "max_new_tokens"),
        (lambda m, p: generate(m, p, max_new_tokens=2, do_sample=True, temperature=0.0), ValueError, "temperature"),
        (lambda m, p: generate(m, p, max_new_tokens=2, do_sample=True, top_k=0), ValueError, "top_k"),
        (lambda m, p: generate(m, p, max_new_tokens=2, do_sample=True, top_p=1.5), ValueError, "top_p"),
        (lambda m, p: generate(m, p, max_new_tokens=2, do_sample=True, best_of_n=2), ValueError, "score_fn"),
        (lambda m, p: generate(m, p, max_new_tokens=2, num_return_sequences=2), ValueError, "do_sample"),
        (lambda m, p: generate(m, p, max_new_tokens=2, delta=0.0), ValueError, "delta"),
    ],
)
def test_bad_options_raise(call, error, match):
    with pytest.raises(error, match=match):
        call(tiny_model(), text_ids(4))


# ---- transformers parity


def test_greedy_equals_transformers_generate(tmp_path):
    pytest.importorskip("transformers")
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                  patch_size=14)
    text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=262, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG, image_seq_length=4)
    reference = InternVLForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    reference.save_pretrained(tmp_path)
    ours = InternVL3.from_pretrained(tmp_path).eval()

    steps = 8
    for prompt, pixels in [
        (text_ids(9), None),
        (torch.cat([text_ids(3), torch.tensor([259]), image_ids(2), torch.tensor([260]), text_ids(3)]), tiles(2)),
    ]:
        images = {} if pixels is None else {"pixel_values": pixels}
        with torch.no_grad():
            expected = reference.generate(
                input_ids=prompt[None], attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long), **images,
                max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0,
            )[0, prompt.shape[0]:]
        assert torch.equal(generate(ours, prompt, pixels, max_new_tokens=steps).tokens, expected)
