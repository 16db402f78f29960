"""The reference InternVL3 model (model/): configs and presets, parameter counts on the meta device, and the
forward pass on packs (packing, V2PE deltas, the weighted loss, backward, blank tiles, model.data batches), and
the vision tower and projector under FSDP2 returning no views.
Parity with transformers and checkpoints: tests/model/test_model_checkpoint.py."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import internvl3_engine as engine
from model.__main__ import main as model_main
from model.config import PRESETS, InternVL3Config, ProjectorConfig, TextConfig, VisionConfig
from model.modeling import InternVL3, InternVL3Output

TINY = InternVL3Config.preset("tiny")
IMG = TINY.image_token_id
PER_TILE = TINY.tokens_per_tile


def perturbed(model: InternVL3, scale: float = 0.05) -> InternVL3:
    """Noise on every parameter, so no norm weight, bias, CLS token or layer scale keeps its init value."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return model.eval()


def tiny_model() -> InternVL3:
    return perturbed(InternVL3(InternVL3Config.preset("tiny")))


def text_ids(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,))


def image_ids(tiles: int) -> torch.Tensor:
    return torch.full((tiles * PER_TILE,), IMG)


def tiles(n: int, size: int = 56) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---- configs


def test_presets_build_and_round_trip_through_dicts():
    for name in PRESETS:
        config = InternVL3Config.preset(name)
        assert config.name == name
        assert InternVL3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert InternVL3Config.preset("internvl3-8b") is not InternVL3Config.preset("internvl3-8b")
    with pytest.raises(ValueError, match="unknown preset"):
        InternVL3Config.preset("internvl3-3b")


def test_preset_shapes_are_the_published_ones():
    small = InternVL3Config.preset("internvl3-1b")
    assert (small.vision.hidden_size, small.vision.num_layers, small.vision.num_heads) == (1024, 24, 16)
    assert small.vision.norm_type == "layer_norm" and not small.vision.qk_norm and small.vision.qkv_bias
    assert small.tokens_per_tile == 256 and small.image_token_id == 151667
    big = InternVL3Config.preset("internvl3-78b")
    assert (big.vision.hidden_size, big.vision.num_layers, big.vision.num_heads, big.vision.intermediate_size) == (
        3200, 45, 25, 12800,
    )
    assert big.vision.norm_type == "rms_norm" and big.vision.qk_norm
    text = big.text
    assert (text.hidden_size, text.num_layers, text.num_heads, text.num_kv_heads, text.intermediate_size) == (
        8192, 80, 64, 8, 29568,
    )
    assert (text.vocab_size, text.rope_theta, text.tie_word_embeddings, text.head_dim) == (151674, 1e6, False, 128)
    assert InternVL3Config.preset("internvl3-1b").text.head_dim == 64  # 896 / 14


def test_tiny_preset_matches_the_data_pipeline():
    from model.data import ByteTokenizer, num_image_tokens

    tokenizer = ByteTokenizer()
    assert TINY.text.vocab_size == tokenizer.vocab_size
    assert TINY.image_token_id == tokenizer.token_to_id("<IMG_CONTEXT>")
    assert TINY.tokens_per_tile == num_image_tokens(TINY.vision.image_size, TINY.vision.patch_size, 0.5) == 4


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: VisionConfig(hidden_size=30, num_heads=4), "multiple of num_heads"),
        (lambda: VisionConfig(image_size=50), "multiple of patch_size"),
        (lambda: VisionConfig(norm_type="batch_norm"), "norm_type"),
        (lambda: TextConfig(num_heads=6, num_kv_heads=4, hidden_size=96), "multiple of num_kv_heads"),
        (lambda: TextConfig(num_layers=0), "positive int"),
        (lambda: ProjectorConfig(downsample_ratio=0.3), "downsample_ratio"),
        (lambda: InternVL3Config(text=TextConfig(vocab_size=100)), "image_token_id"),
    ],
)
def test_bad_configs_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---- parameter counts on the meta device

# Published sizes. Totals: the InternVL3 report (arXiv 2504.10479, Table 1) and model cards list InternVL3-1B
# 0.9B, -2B 2.1B, -8B 8.1B, -78B 78.4B (the Hugging Face Hub pages show 938M, 2.09B, 7.94B, 78.4B).
# Components: InternViT-300M-448px-V2_5's card 304M, InternViT-6B-448px-V2_5's 5.5B; the Qwen2.5 cards'
# non-embedding parameters 0.36B (0.5B), 1.31B (1.5B), 6.53B (7B), 70.0B (72B).
PUBLISHED = {
    # preset: (total, vision, LLM without its embedding and head)
    "internvl3-1b": (0.9e9, 304e6, 0.36e9),
    "internvl3-2b": (2.1e9, 304e6, 1.31e9),
    "internvl3-8b": (8.1e9, 304e6, 6.53e9),
    "internvl3-78b": (78.4e9, 5.5e9, 70.0e9),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_the_published_sizes(name, capsys):
    assert model_main(["info", "--preset", name, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["parameters"]
    total, vision, non_embedding = PUBLISHED[name]
    text = InternVL3Config.preset(name).text
    embedding_and_head = 2 * text.vocab_size * text.hidden_size  # untied in InternVL3
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["language"]
    assert abs(counts["vision"] / vision - 1) < 0.02
    assert abs((counts["language"] - embedding_and_head) / non_embedding - 1) < 0.02
    if name == "internvl3-1b":
        # "0.9B" has one significant digit (938M exactly): compare at that precision.
        assert round(counts["total"] / 1e9, 1) == 0.9
    else:
        assert abs(counts["total"] / total - 1) < 0.02


def test_info_builds_on_the_meta_device_without_allocating(capsys):
    config = InternVL3Config.preset("internvl3-78b")
    with torch.device("meta"):
        model = InternVL3(config)
    assert all(p.is_meta for p in model.parameters())
    assert set(model.engine_components()) == {"vision", "projector", "language"}
    assert model.num_parameters()["total"] > 78e9
    assert model_main(["info", "--preset", "internvl3-78b"]) == 0
    out = capsys.readouterr().out
    assert "InternViT" in out and "total" in out and "QK-norm" in out


# ---- forward


def test_output_shapes_and_logits_flag():
    model = tiny_model()
    ids = torch.cat([text_ids(3), image_ids(2), text_ids(4)])
    out = model(ids, pixel_values=tiles(2))
    assert isinstance(out, InternVL3Output)
    assert out.logits.shape == (ids.shape[0], TINY.text.vocab_size) and out.loss is None
    assert out.positions.dtype == torch.float32 and torch.equal(out.positions, torch.arange(ids.shape[0], dtype=torch.float32))
    labels = torch.randint(0, 256, ids.shape)
    trained = model(ids, pixel_values=tiles(2), labels=labels)
    assert trained.logits is None and trained.loss.shape == ()
    assert model(ids, pixel_values=tiles(2), labels=labels, return_logits=True).logits is not None


def test_a_pack_gives_each_samples_logits_alone():
    model = tiny_model()
    samples = [
        (torch.cat([text_ids(2), image_ids(1), text_ids(5)]), tiles(1)),
        (text_ids(7), None),
        (torch.cat([text_ids(1), image_ids(2), text_ids(2), image_ids(1), text_ids(3)]), tiles(3)),
    ]
    with torch.no_grad():
        alone = [model(ids, pixel_values=pixels).logits for ids, pixels in samples]
        packed = engine.pack_lengths([len(ids) for ids, _ in samples])
        out = model(
            torch.cat([ids for ids, _ in samples]),
            pixel_values=torch.cat([pixels for _, pixels in samples if pixels is not None]),
            cu_seqlens=packed.cu_seqlens,
            max_seqlen=packed.max_seqlen,
        )
    for logits, (start, end) in zip(alone, zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist())):
        assert rel_err(out.logits[start:end], logits) < 1e-5
    # max_seqlen None is read from cu_seqlens
    with torch.no_grad():
        again = model(torch.cat([ids for ids, _ in samples]),
                      pixel_values=torch.cat([p for _, p in samples if p is not None]), cu_seqlens=packed.cu_seqlens)
    assert torch.equal(again.logits, out.logits)


def test_v2pe_delta_below_one_changes_only_the_image_and_later_tokens():
    model = tiny_model()
    before, after = 4, 5
    ids = torch.cat([text_ids(before), image_ids(2), text_ids(after)])
    pixels = tiles(2)
    is_visual = ids == IMG
    cu_seqlens = engine.cu_seqlens_from_lengths([ids.shape[0]])
    positions = engine.v2pe_position_ids(is_visual, cu_seqlens, 0.5)
    # 4 text tokens at 0..3, 8 image tokens at 3.5..7, then ceil(7) + 1 = 8..12
    assert positions[before:before + 2].tolist() == [3.5, 4.0] and positions[-after:].tolist() == [8.0, 9, 10, 11, 12]
    with torch.no_grad():
        ones = model(ids, pixel_values=pixels).logits
        halves = model(ids, pixel_values=pixels, positions=positions).logits
    assert torch.allclose(halves[:before], ones[:before], rtol=1e-6, atol=1e-6)
    # from the first image token on (at 3.5 instead of 4) every position, hence every row, differs
    for t in range(before, ids.shape[0]):
        assert not torch.allclose(halves[t], ones[t], rtol=1e-4, atol=1e-5), t
    assert torch.isfinite(halves).all()


def test_loss_is_the_weighted_cross_entropy():
    model = tiny_model()
    samples = [torch.cat([text_ids(3), image_ids(1), text_ids(6)]), text_ids(9)]
    ids = torch.cat(samples)
    packed = engine.pack_lengths([len(s) for s in samples])
    labels = torch.randint(0, TINY.text.vocab_size, ids.shape)
    labels[torch.rand(ids.shape) < 0.3] = -100
    labels[ids == IMG] = -100
    weights = engine.loss_weights(labels, packed.cu_seqlens, "square")
    pixels = tiles(1)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels, cu_seqlens=packed.cu_seqlens, labels=labels,
                    loss_weights=weights, return_logits=True)
        mean = model(ids, pixel_values=pixels, cu_seqlens=packed.cu_seqlens, labels=labels)
        given = model(ids, pixel_values=pixels, cu_seqlens=packed.cu_seqlens, labels=labels,
                      loss_weights=weights, loss_normalizer=2.0)
    ce = F.cross_entropy(out.logits.double(), labels, ignore_index=-100, reduction="none")
    expected = (weights.double() * ce).sum() / weights.double().sum()
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    token_mean = F.cross_entropy(out.logits.double(), labels, ignore_index=-100)
    assert abs(mean.loss.item() - token_mean.item()) <= 1e-5 * abs(token_mean.item())
    halved = (weights.double() * ce).sum().item() / 2.0
    assert abs(given.loss.item() - halved) <= 1e-5 * halved


def test_per_token_loss_is_the_labels_negated_log_probabilities():
    """loss_reduction='none' without loss weights: the per-token CE, i.e. -log softmax(logits)[label], 0 at
    ignored tokens (what MPO sums per response, without the [T, V] logits); 'sum' is its weighted sum."""
    model = tiny_model()
    ids = torch.cat([text_ids(3), image_ids(1), text_ids(6)])
    labels = torch.randint(0, TINY.text.vocab_size, ids.shape)
    labels[torch.rand(ids.shape) < 0.3] = -100
    labels[ids == IMG] = -100
    pixels = tiles(1)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels, labels=labels, loss_reduction="none", return_logits=True)
        weights = torch.rand(ids.shape)
        total = model(ids, pixel_values=pixels, labels=labels, loss_weights=weights, loss_reduction="sum").loss
    supervised = labels != -100
    log_probs = torch.log_softmax(out.logits.double(), dim=-1).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    expected = torch.where(supervised, -log_probs, 0)
    assert out.loss.shape == ids.shape and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert (out.loss[~supervised] == 0).all()
    torch.testing.assert_close(total.double(), (weights.double() * expected).sum(), rtol=1e-5, atol=1e-5)


def test_backward_reaches_every_parameter():
    model = tiny_model().train()
    ids = torch.cat([text_ids(3), image_ids(2), text_ids(6)])
    labels = torch.randint(0, 256, ids.shape)
    model(ids, pixel_values=tiles(2), labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_blank_tiles_run_the_vision_tower_with_no_image_tokens():
    model = tiny_model().train()
    ids = text_ids(8)
    labels = torch.randint(0, 256, ids.shape)
    blank = torch.zeros(1, 3, 56, 56)
    out = model(ids, pixel_values=blank, labels=labels, image_flags=torch.zeros(1, dtype=torch.int64))
    out.loss.backward()
    patch = model.vision.embeddings.patch_embedding.weight
    assert patch.grad is not None and torch.count_nonzero(patch.grad) == 0
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels).loss, out.loss.detach())
    # flags pick the real tiles among others
    mixed = torch.cat([text_ids(2), image_ids(1)])
    pixels = tiles(2)
    with torch.no_grad():
        picked = model(mixed, pixel_values=pixels, image_flags=torch.tensor([0, 1])).logits
        direct = model(mixed, pixel_values=pixels[1:]).logits
    assert torch.allclose(picked, direct, rtol=1e-6, atol=1e-6)


def _view_warnings(model: nn.Module, *inputs, backward: bool = True) -> list[str]:
    """FSDP2's warnings that a sharded module returned a view, from one forward (and backward) of ``model``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = model(*inputs)
        if backward:
            (output.loss if isinstance(output, InternVL3Output) else output).sum().backward()
    return [str(warning.message) for warning in caught if "returned a view tensor" in str(warning.message)]


def test_sharded_vision_tower_and_projector_return_tensors_of_their_own(tmp_path):
    """FSDP2 warns when a sharded module returns a view (an in-place op on it would skip the all-gather).
    Under parallelize (one gloo rank), with and without the ViT's final norm, for one tile and several,
    neither component returns one; a module that does shows that the warning is looked for right."""
    from torch.distributed.fsdp import fully_shard

    from internvl3_engine.parallel import parallelize

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        control = nn.Sequential(nn.Linear(4, 4), nn.Flatten(0))  # Flatten returns a view of the linear's output
        fully_shard(control)
        assert len(_view_warnings(control, torch.randn(2, 4))) == 1
        for final_norm in (False, True):
            config = InternVL3Config.preset("tiny")
            config.vision = dataclasses.replace(config.vision, final_norm=final_norm)
            model = InternVL3(config)
            parallelize(model)
            for count in (1, 3):
                ids = torch.cat([text_ids(3), image_ids(count), text_ids(4)])
                assert _view_warnings(model, ids, tiles(count), None, None, torch.randint(0, 256, ids.shape)) == []
    finally:
        dist.destroy_process_group()


def test_tiles_of_another_size_interpolate_the_position_embedding():
    model = tiny_model()
    # 84-pixel tiles: 6x6 patches (the embedding was learned for 4x4) -> 9 tokens a tile
    ids = torch.cat([text_ids(2), torch.full((9,), IMG), text_ids(2)])
    with torch.no_grad():
        out = model(ids, pixel_values=tiles(1, size=84))
    assert torch.isfinite(out.logits).all()


def test_mismatched_images_and_bad_inputs_raise():
    model = tiny_model()
    ids = torch.cat([text_ids(2), image_ids(2)])
    with pytest.raises(ValueError):
        model(ids, pixel_values=tiles(1))
    with pytest.raises(ValueError, match="1-D"):
        model(ids[None])
    with pytest.raises(ValueError, match="pixel_values"):
        model(ids, pixel_values=torch.randn(2, 56, 56))


def test_a_model_data_batch_trains():
    from model.data import PackingConfig, Sample, collate

    def sample(parts):
        ids = torch.cat(parts)
        labels = ids.clone()
        labels[ids >= 256] = -100
        visual = ids == IMG
        n_tiles = int(visual.sum()) // PER_TILE
        return Sample(ids, labels, visual, tiles(n_tiles) if n_tiles else None, [n_tiles] if n_tiles else [])

    items = [sample([text_ids(3), image_ids(2), text_ids(5)]), sample([text_ids(9)])]
    batch = collate(items, PackingConfig(delta=0.25, loss_mode="square"))
    model = tiny_model().train()
    out = model(
        batch.input_ids, pixel_values=batch.pixel_values, cu_seqlens=batch.cu_seqlens, positions=batch.positions,
        labels=batch.labels, loss_weights=batch.loss_weights, max_seqlen=batch.max_seqlen, image_flags=batch.image_flags,
    )
    assert torch.equal(out.positions, batch.positions)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_meta_construction_then_materialize():
    with torch.device("meta"):
        model = InternVL3(dataclasses.replace(TINY))
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(text_ids(5)).logits).all()
    layer = model.vision.layers[0]
    assert torch.equal(layer.ls1, torch.full_like(layer.ls1, TINY.vision.layer_scale_init))


@pytest.mark.gpu
def test_real_widths_in_bfloat16_on_gpu():
    """InternVL3-1B's widths (2 layers each) in bfloat16 on CUDA: forward and backward of a pack of 448-pixel
    tiles through the engine's GPU kernels, loss close to the float32 model's."""
    config = InternVL3Config.preset("internvl3-1b")
    config.vision.num_layers = config.text.num_layers = 2
    torch.manual_seed(0)
    model = InternVL3(config).cuda()
    per_tile = config.tokens_per_tile
    samples = [torch.cat([torch.randint(0, 1000, (30,)), torch.full((2 * per_tile,), config.image_token_id),
                          torch.randint(0, 1000, (50,))]), torch.randint(0, 1000, (300,))]
    ids = torch.cat(samples).cuda()
    packed = engine.pack_lengths([len(s) for s in samples], device="cuda")
    labels = torch.roll(ids, -1)
    labels[ids == config.image_token_id] = -100
    pixels = torch.randn(2, 3, 448, 448, device="cuda")
    weights = engine.loss_weights(labels, packed.cu_seqlens, "square")
    kwargs = dict(cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen, labels=labels, loss_weights=weights)
    with torch.no_grad():
        gold = model(ids, pixel_values=pixels, **kwargs).loss
    model = model.to(torch.bfloat16)
    loss = model(ids, pixel_values=pixels, **kwargs).loss
    loss.backward()
    assert abs(loss.item() - gold.item()) < 0.05 * abs(gold.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: VisionConfig(hidden_size=30, num_heads=4), "vision hidden_size 30 must be a multiple of num_heads 4"),
        (lambda: VisionConfig(image_size=50, patch_size=14), "vision image_size 50 must be a multiple of patch_size 14"),
        (lambda: VisionConfig(norm_type="batch_norm"), "vision norm_type must be one of"),
        (lambda: TextConfig(num_heads=14, num_kv_heads=4), "text num_heads 14 must be a multiple of num_kv_heads 4"),
        (lambda: TextConfig(hidden_act="relu"), "text hidden_act must be one of"),
        (lambda: ProjectorConfig(downsample_ratio=0.3), "downsample_ratio must be 1/r"),
        (lambda: TextConfig(num_layers=0), "TextConfig.num_layers must be a positive int"),
    ],
)
def test_bad_config(make, match):
    with pytest.raises(ValueError, match=match):
        make()
