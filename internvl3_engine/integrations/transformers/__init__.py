"""Drop-in engine kernels for transformers' InternVL and Qwen2 models, patched in place (in the manner of
Liger-Kernel's ``apply_liger_kernel_to_*`` functions)::

    from internvl3_engine.integrations.transformers import apply_internvl3_engine_to_internvl
    model = InternVLForConditionalGeneration.from_pretrained(...)
    apply_internvl3_engine_to_internvl(model)   # then train or run it as before

What changes (each part can be turned off):

- ``attention``: the language model's and the vision tower's attention run through ``v2pe_attention`` on packed
  (unpadded) tokens. The model's attention implementation (its config's, the text and vision configs') becomes
  ``"internvl3_engine"``, registered with transformers' AttentionInterface, with a mask function that hands
  the attention the 2-D padding mask instead of a 4-D one. Sequence boundaries come from, in order: a
  ``cu_seqlens`` keyword argument of the forward (int32 [B+1] over the B*S tokens of the batch;
  FlashAttention's ``cu_seq_lens_q`` also works), the 2-D ``attention_mask`` (each row's unmasked tokens are
  one sequence), or ``position_ids``: a position not greater than the one before it starts a new sequence
  (packed rows, whose positions restart at 0 for every sample; V2PE positions grow strictly within a
  sample). Without any of these every row is one sequence. The vision tower's tiles are one non-causal
  sequence each. Decoding with a KV cache (queries fewer than keys) runs a plain PyTorch attention over the
  cache instead; a 4-D attention mask, attention dropout or a sliding window raise.
- ``rotary``: Qwen2's rotary embedding is computed by the engine from float32 ``position_ids`` (V2PE positions
  may be fractional: they are never truncated), inside ``v2pe_attention`` when it runs, else with
  ``apply_rotary``; keys enter a KV cache rotated, as in transformers. Needs ``rope_type`` "default".
- ``pixel_unshuffle_layernorm``: InternVL's pixel shuffle and the projector's LayerNorm run fused in
  ``pixel_unshuffle_layernorm``: ``InternVLModel.pixel_shuffle`` passes the vision features through and the
  projector, seeing unshuffled features (their width is the vision width), applies the fused op to them
  (features shuffled elsewhere still take the plain LayerNorm).
- ``cross_entropy``: given ``labels``, the causal-LM loss is ``linear_cross_entropy`` of the final hidden states
  and the head's weight (the [B, S, V] logits are never built for it), with transformers' conventions: labels
  shifted by one within each row (or ``shift_labels`` given), ``ignore_index`` -100, the mean over supervised
  tokens or the sum divided by ``num_items_in_batch``. ``loss_weights`` makes it InternVL3's weighted loss
  sum(w * CE) / sum(w): a mode of ``loss_weights`` ("square", InternVL3's square averaging; "sample";
  "token") over the samples (rows, or the packed samples found as for the attention), or a float tensor of
  the labels' shape given at the labels' positions. In training mode the output's ``logits`` are then None
  (as Liger's fused loss does); in eval mode they are computed as well. The patched forward keeps the
  class's signature and output class: arguments other than the head's pass to the inner model unchanged, and
  the output takes the inner model's fields by name.

Activation checkpointing: the engine's (``internvl3_engine.parallel.checkpoint_blocks``, or
``activation_checkpointing`` in a plan under ``parallelize``) runs the checkpointed decoder layers without a KV
cache whenever gradients are enabled, as transformers' own checkpointing does (the model's config has
``use_cache`` True, and a layer recomputed in backward would write its keys and values into the cache again),
with a warning; generation, under torch.no_grad, keeps its cache.

Tested with transformers 5.20 (the oldest release the ``transformers`` extra allows) to 5.25; the KV cache
argument is ``cache`` from 5.24 and ``past_key_values`` before, both accepted.

transformers is an optional dependency (the ``transformers`` extra): it is imported by these functions only.
"""

from .attention import ATTENTION_IMPLEMENTATION, engine_attention_forward
from .monkey_patch import apply_internvl3_engine_to_internvl, apply_internvl3_engine_to_qwen2


__all__ = ["ATTENTION_IMPLEMENTATION", "apply_internvl3_engine_to_internvl", "apply_internvl3_engine_to_qwen2", "engine_attention_forward"]
