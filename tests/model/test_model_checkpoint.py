"""Checkpoint interop of the reference InternVL3 model: logits equal to transformers' InternVL (float32,
relative error <= 1e-4) for text-only and multi-image inputs, loading transformers' save_pretrained folders
(single file, sharded, in-memory names), save_pretrained that transformers loads back, the original OpenGVLab
layout, and config conversion. transformers is imported only here (the model never imports it)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from model.weights import from_layout, read_tensors, to_layout
from model.config import PRESETS, InternVL3Config
from model.modeling import InternVL3

transformers = pytest.importorskip("transformers")
from transformers import InternVLConfig, InternVLForConditionalGeneration  # noqa: E402

IMG = 261
VISION_VARIANTS = {
    # InternViT-300M-like: LayerNorm, q/k/v bias, no QK-norm
    "300m": dict(norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
    # InternViT-6B-like: RMSNorm, QK-norm, no q/k/v bias; plus transformers' optional final LayerNorm
    "6b": dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True, use_mean_pooling=False),
}


def hf_config(variant: str = "300m", tie: bool = False) -> InternVLConfig:
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                  patch_size=14, **VISION_VARIANTS[variant])
    text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=262, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG, image_seq_length=4,
                          tie_word_embeddings=tie)


def hf_model(variant: str = "300m", tie: bool = False) -> InternVLForConditionalGeneration:
    """A random tiny transformers InternVL in float32, every parameter moved off its init value."""
    model = InternVLForConditionalGeneration(hf_config(variant, tie)).float().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def hf_logits(model, ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], pixel_values=pixel_values).logits[0]


def our_logits(model, ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pixel_values=pixel_values).logits


def multi_image_input(per_tile: int = 4, tile_size: int = 56):
    """Text, an image of 2 tiles (as <img> ... </img>), text, an image of 1 tile, text: 3 tiles in order."""
    text = lambda n: torch.randint(0, 256, (n,))  # noqa: E731
    image = lambda tiles: torch.cat([torch.tensor([259]), torch.full((tiles * per_tile,), IMG), torch.tensor([260])])  # noqa: E731
    ids = torch.cat([text(5), image(2), text(4), image(1), text(6)])
    return ids, torch.randn(3, 3, tile_size, tile_size)


@pytest.mark.parametrize("variant", list(VISION_VARIANTS))
def test_logits_equal_transformers(tmp_path, variant):
    reference = hf_model(variant)
    reference.save_pretrained(tmp_path)
    ours = InternVL3.from_pretrained(tmp_path).eval()
    assert ours.config.vision.qk_norm == (variant == "6b") and not ours.config.text.tie_word_embeddings

    text_only = torch.randint(0, 262, (23,))
    assert rel_err(our_logits(ours, text_only), hf_logits(reference, text_only)) <= 1e-4

    ids, pixels = multi_image_input()
    assert rel_err(our_logits(ours, ids, pixels), hf_logits(reference, ids, pixels)) <= 1e-4


def test_logits_equal_transformers_on_resized_tiles(tmp_path):
    """84-pixel tiles: both models resize the 4x4 position embedding bicubically to 6x6 (9 tokens a tile)."""
    reference = hf_model()
    reference.save_pretrained(tmp_path)
    ours = InternVL3.from_pretrained(tmp_path).eval()
    ids, pixels = multi_image_input(per_tile=9, tile_size=84)
    assert rel_err(our_logits(ours, ids, pixels), hf_logits(reference, ids, pixels)) <= 1e-4


def test_tied_head_loads_and_saves(tmp_path):
    reference = hf_model(tie=True)
    reference.save_pretrained(tmp_path / "hf")
    ours = InternVL3.from_pretrained(tmp_path / "hf").eval()
    assert ours.language.lm_head.weight is ours.language.embed_tokens.weight
    ids = torch.randint(0, 262, (11,))
    assert rel_err(our_logits(ours, ids), hf_logits(reference, ids)) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(our_logits(ours, ids), hf_logits(back, ids)) <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = InternVL3(InternVL3Config.preset("tiny"))
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ours.eval().save_pretrained(tmp_path)
    names = {name for name, _ in read_tensors(tmp_path)}
    reference = hf_model()
    reference.save_pretrained(tmp_path / "hf")
    assert names == {name for name, _ in read_tensors(tmp_path / "hf")}  # the names transformers itself writes

    loaded = InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.image_token_id == IMG and loaded.config.text_config.rope_parameters["rope_theta"] == 1e6
    ids, pixels = multi_image_input()
    assert rel_err(our_logits(ours, ids, pixels), hf_logits(loaded, ids, pixels)) <= 1e-4
    again = InternVL3.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_sharded_checkpoints_both_ways(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = InternVL3.from_pretrained(tmp_path / "hf").eval()
    ids, pixels = multi_image_input()
    expected = hf_logits(reference, ids, pixels)
    assert rel_err(our_logits(ours, ids, pixels), expected) <= 1e-4

    ours.save_pretrained(tmp_path / "ours", max_shard_size=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(tmp_path / "ours" / "model.safetensors")
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(hf_logits(back, ids, pixels), expected) <= 1e-4


def test_in_memory_transformers_names_load(tmp_path):
    """A state dict with transformers' in-memory names (model.vision_tower.*, lm_head) loads too."""
    from safetensors.torch import save_file

    reference = hf_model()
    reference.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours = InternVL3.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 262, (9,))
    assert rel_err(our_logits(ours, ids), hf_logits(reference, ids)) <= 1e-4


def test_opengvlab_layout_loads(tmp_path):
    reference = hf_model("6b")
    reference.save_pretrained(tmp_path / "hf")
    ours = InternVL3.from_pretrained(tmp_path / "hf").eval()
    ours.config.vision.final_norm = False  # InternVLChatModel has no final vision norm
    ours.vision.final_norm = None

    state = to_layout(ours.state_dict(), "opengvlab")
    qkv = state["vision_model.encoder.layers.0.attn.qkv.weight"]
    assert qkv.shape == (3 * 32, 32) and "vision_model.encoder.layers.0.attn.qkv.bias" not in state
    assert torch.equal(qkv[32:64], ours.vision.layers[0].attn.k_proj.weight)
    expected_names = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
                      "vision_model.embeddings.patch_embedding.weight", "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias",
                      "vision_model.encoder.layers.1.attn.q_norm.weight", "vision_model.encoder.layers.1.ls2",
                      "vision_model.encoder.layers.1.attn.proj.weight", "language_model.lm_head.weight",
                      "language_model.model.embed_tokens.weight", "language_model.model.layers.1.input_layernorm.weight"}
    assert expected_names <= set(state)
    restored = from_layout(state, "opengvlab")
    assert restored.keys() == ours.state_dict().keys()
    assert all(torch.equal(restored[k], v) for k, v in ours.state_dict().items())

    ours.save_pretrained(tmp_path / "chat", layout="opengvlab")
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert config["model_type"] == "internvl_chat" and config["vision_config"]["qk_normalization"] is True
    loaded = InternVL3.from_pretrained(tmp_path / "chat").eval()
    ids, pixels = multi_image_input()
    assert rel_err(our_logits(loaded, ids, pixels), our_logits(ours, ids, pixels)) <= 1e-6


def test_bad_checkpoints_raise(tmp_path):
    from safetensors.torch import save_file

    reference = hf_model()
    reference.save_pretrained(tmp_path)
    tensors = dict(read_tensors(tmp_path))
    del tensors["language_model.model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks language.norm.weight"):
        InternVL3.from_pretrained(tmp_path)
    tensors["language_model.model.norm.weight"] = torch.ones(64)
    tensors["vision_tower.mystery.weight"] = torch.ones(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys"):
        InternVL3.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layout"):
        InternVL3(InternVL3Config.preset("tiny")).save_pretrained(tmp_path / "x", layout="megatron")
    with pytest.raises(FileNotFoundError):
        InternVL3.from_pretrained(tmp_path / "nothing-here")


def test_configs_convert_both_ways():
    reference = hf_config("6b")
    config = InternVL3Config.from_hf(reference.to_dict())
    assert config.vision.norm_type == "rms_norm" and config.vision.qk_norm and not config.vision.qkv_bias
    assert config.vision.final_norm and config.text.rope_theta == 1e6 and config.image_token_id == IMG
    assert (config.text.num_heads, config.text.num_kv_heads, config.text.head_dim) == (4, 2, 16)
    assert InternVL3Config.from_hf(InternVLConfig(**config.to_hf()).to_dict()) == config
    for name in PRESETS:
        preset = InternVL3Config.preset(name)
        via_transformers = InternVLConfig(**preset.to_hf()).to_dict()
        assert InternVL3Config.from_hf(via_transformers).to_dict() | {"name": name} == preset.to_dict()
        assert InternVL3Config.from_hf(preset.to_opengvlab()).to_dict() | {"name": name} == preset.to_dict()
    # transformers 4 wrote rope_theta in the text config; InternVLConfig defaults tie_word_embeddings to True
    old = {"model_type": "internvl", "text_config": {"model_type": "qwen2", "rope_theta": 5e5, "vocab_size": 151674,
                                                      "hidden_size": 64, "num_attention_heads": 4}}
    loaded = InternVL3Config.from_hf(old)
    assert loaded.text.rope_theta == 5e5 and loaded.text.tie_word_embeddings
    with pytest.raises(ValueError, match="rope"):
        InternVL3Config.from_hf({"text_config": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}})
    # Both layouts share the language-model checks.
    opengvlab = InternVL3Config.preset("tiny").to_opengvlab()
    for change, match in (({"use_sliding_window": True}, "sliding-window"), ({"model_type": "llama"}, "only a Qwen2")):
        with pytest.raises(ValueError, match=match):
            InternVL3Config.from_hf({**opengvlab, "llm_config": {**opengvlab["llm_config"], **change}})
