"""The apply_internvl3_engine_to_* functions: what they patch, and the checks before patching."""

from __future__ import annotations

import inspect
import types

from .attention import ATTENTION_IMPLEMENTATION, _pack_before_decoder, _padding_mask, engine_attention_forward
from .causal_lm import _causal_lm_forward
from .internvl import _projector_forward, _unshuffled
from .qwen2 import _qwen2_attention_forward


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "internvl3_engine.integrations.transformers patches transformers models, but transformers is not "
            "installed: pip install 'internvl3-engine[transformers]' (or pip install transformers)"
        ) from error
    return transformers


def _register_attention() -> None:
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, engine_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, _padding_mask)



def _patch_method(module, name: str, function) -> None:
    setattr(module, name, types.MethodType(function, module))


def _patch_causal_lm_forward(model, output_class) -> None:
    """Replace a causal LM's forward with _causal_lm_forward, taking the class's own forward signature
    (positional arguments bind by it, and generate() checks its keyword arguments against it)."""
    signature = inspect.signature(type(model).forward)
    var_keyword = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    def forward(self, *args, **kwargs):
        named = signature.bind_partial(self, *args, **kwargs).arguments
        del named[next(iter(signature.parameters))]  # self
        if var_keyword:
            named.update(named.pop(var_keyword[0], {}))
        return _causal_lm_forward(self, named, output_class)

    forward.__signature__ = signature
    _patch_method(model, "forward", forward)


def _patch_qwen2_decoders(model, attention: bool, rotary: bool) -> None:
    from transformers.models.qwen2 import modeling_qwen2

    decoders = [m for m in model.modules() if isinstance(m, modeling_qwen2.Qwen2Model)]
    if not decoders:
        raise TypeError(f"found no transformers Qwen2Model in {type(model).__name__}")
    for decoder in decoders:
        config = decoder.config
        if attention:
            if getattr(config, "attention_dropout", 0.0):
                raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no dropout, but attention_dropout is {config.attention_dropout}")
            if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
                raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no sliding window; the config uses one")
            decoder.set_attn_implementation(ATTENTION_IMPLEMENTATION)
            if not getattr(decoder, "internvl3_engine_packing_hook", None):
                decoder.internvl3_engine_packing_hook = decoder.register_forward_pre_hook(_pack_before_decoder, with_kwargs=True)
        if rotary:
            rope = getattr(config, "rope_parameters", None) or {}
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"the engine's rotary is Qwen2's default rotary; this config's rope_type is {rope_type!r}")
            theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
            for layer in decoder.layers:
                layer.self_attn.internvl3_engine_rope_theta = theta
                _patch_method(layer.self_attn, "forward", _qwen2_attention_forward)


def apply_internvl3_engine_to_qwen2(model, *, attention: bool = True, rotary: bool = True, cross_entropy: bool = True):
    """Patch a transformers Qwen2 model (Qwen2ForCausalLM, Qwen2Model, or any module holding a Qwen2Model) in place
    to run on the engine: ``attention`` packed varlen v2pe_attention, ``rotary`` the engine's rotary at float
    position_ids, ``cross_entropy`` the fused linear cross-entropy loss (Qwen2ForCausalLM). Returns the model.
    Patching again is harmless. See the module docstring for the details."""
    _require_transformers()
    from transformers.models.qwen2 import modeling_qwen2

    if attention:
        _register_attention()
    _patch_qwen2_decoders(model, attention, rotary)
    if cross_entropy and isinstance(model, modeling_qwen2.Qwen2ForCausalLM):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        _patch_causal_lm_forward(model, CausalLMOutputWithPast)
    return model


def apply_internvl3_engine_to_internvl(
    model, *, attention: bool = True, rotary: bool = True, pixel_unshuffle_layernorm: bool = True, cross_entropy: bool = True
):
    """Patch a transformers InternVL model (InternVLForConditionalGeneration or InternVLModel, with a Qwen2
    language model) in place to run on the engine: ``attention`` packed varlen v2pe_attention in the language
    model (causal) and the vision tower (non-causal, no positions), ``rotary`` the engine's rotary at float V2PE
    position_ids, ``pixel_unshuffle_layernorm`` the projector's fused pixel shuffle + LayerNorm,
    ``cross_entropy`` the fused linear cross-entropy loss. Returns the model. Patching again is harmless. See the
    module docstring for the details."""
    _require_transformers()
    from transformers.models.internvl import modeling_internvl as internvl

    base = model.model if isinstance(model, internvl.InternVLForConditionalGeneration) else model
    if not isinstance(base, internvl.InternVLModel):
        raise TypeError(f"expected a transformers InternVLForConditionalGeneration or InternVLModel, got {type(model).__name__}")
    if attention:
        _register_attention()
        vision = base.vision_tower
        if getattr(vision.config, "attention_dropout", 0.0):
            raise ValueError(f"the {ATTENTION_IMPLEMENTATION} attention has no dropout, but the vision attention_dropout is {vision.config.attention_dropout}")
    _patch_qwen2_decoders(base.language_model, attention, rotary)
    if attention:
        # The vision tower's and the top-level config's too, so that model.config says what runs.
        base.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    if pixel_unshuffle_layernorm:
        projector = base.multi_modal_projector
        if projector.layer_norm.weight is None or projector.layer_norm.bias is None:
            raise ValueError("pixel_unshuffle_layernorm needs the projector's LayerNorm weight and bias")
        projector.internvl3_engine_downsample_ratio = float(base.config.downsample_ratio)
        _patch_method(projector, "forward", _projector_forward)
        _patch_method(base, "pixel_shuffle", _unshuffled)
    if cross_entropy and isinstance(model, internvl.InternVLForConditionalGeneration):
        _patch_causal_lm_forward(model, internvl.InternVLCausalLMOutputWithPast)
    return model
