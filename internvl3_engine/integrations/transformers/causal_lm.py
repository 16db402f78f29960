"""A causal LM's forward with the loss through linear_cross_entropy (and InternVL3's loss weights)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

import internvl3_engine as engine

from .attention import _cu_seqlens_kwarg, _max_seqlen_kwarg, _packing


_LOSS_KEYWORDS = ("num_items_in_batch", "shift_labels", "ignore_index", "loss_weights")


def _shifted(x: torch.Tensor, fill) -> torch.Tensor:
    """x [B, S] moved one step left within each row (position t takes t + 1's value; the last takes ``fill``):
    the causal LM's targets from labels given at their tokens."""
    return F.pad(x, (0, 1), value=fill)[..., 1:]


def _fused_loss(self, hidden: torch.Tensor, named: dict, loss_keys: dict) -> Optional[torch.Tensor]:
    """The causal-LM loss of the final hidden states [B, S, H] through linear_cross_entropy, or None without
    labels. Token mean over the supervised targets (or the sum over ``num_items_in_batch``), as transformers'
    loss; with ``loss_weights`` sum(w * CE) / sum(w)."""
    labels, shift_labels = named.get("labels"), loss_keys.get("shift_labels")
    if labels is None and shift_labels is None:
        return None
    ignore_index = loss_keys.get("ignore_index", -100)
    targets = _shifted(labels, ignore_index) if shift_labels is None else shift_labels
    targets = targets.to(hidden.device)
    weights, normalizer = loss_keys.get("loss_weights"), loss_keys.get("num_items_in_batch")
    if weights is not None:
        if normalizer is not None:
            raise ValueError(
                "num_items_in_batch counts tokens, but a loss with loss_weights is normalised by the sum of its "
                "weights: leave num_items_in_batch out (with transformers' Trainer, set model.accepts_loss_kwargs "
                "= False)"
            )
        if isinstance(weights, str):
            # A mode of engine.loss_weights over the samples: rows, or the packed samples found as for attention.
            batch, seq = targets.shape[:2]
            samples = _packing(batch, seq, hidden.device, None, named.get("position_ids"), _cu_seqlens_kwarg(named),
                               _max_seqlen_kwarg(named)).cu_seqlens
            weights = engine.loss_weights(targets.reshape(-1), samples, weights, ignore_index)
        elif isinstance(weights, torch.Tensor):
            # Given at the labels' (unshifted) positions: shifted with them.
            if weights.shape != targets.shape:
                raise ValueError(f"loss_weights must have the labels' shape {tuple(targets.shape)}, got {tuple(weights.shape)}")
            if shift_labels is None:
                weights = _shifted(weights, 0.0)
            weights = weights.to(device=targets.device, dtype=torch.float32).reshape(-1)
        else:
            raise TypeError(f"loss_weights must be a mode name or a tensor, got {type(weights).__name__}")
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=hidden.device, dtype=torch.float32).reshape(())
    elif normalizer is not None:
        normalizer = float(normalizer)
    head = self.get_output_embeddings()
    return engine.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), bias=head.bias,
        loss_weights=weights, ignore_index=ignore_index, normalizer=normalizer,
    )


def _kept_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states [B, S, H] whose logits are wanted, as transformers' causal LMs select them: an int
    keeps the last ``logits_to_keep`` positions (0 keeps all), a 1-D tensor those positions of every row, a
    2-D integer tensor per-row positions, a 2-D bool mask its True positions (flattened)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


def _causal_lm_forward(self, named: dict, output_class):
    """The forward of a causal LM (InternVLForConditionalGeneration, Qwen2ForCausalLM) with the loss through
    linear_cross_entropy, from its arguments by name: everything but the head's (labels, logits_to_keep, the
    loss keywords) goes to the inner model unchanged, and the output is ``output_class`` filled from the inner
    model's output fields of the same names, so that arguments and fields renamed by a transformers release
    pass through."""
    return_dict = named.pop("return_dict", None)
    logits_to_keep = named.pop("logits_to_keep", 0)
    loss_keys = {key: named.pop(key) for key in _LOSS_KEYWORDS if key in named}
    labels = named.pop("labels", None)
    outputs = self.model(**named, return_dict=True)
    hidden = outputs.last_hidden_state
    loss = _fused_loss(self, hidden, {**named, "labels": labels}, loss_keys)
    logits = None
    if loss is None or not self.training:
        logits = self.get_output_embeddings()(_kept_positions(hidden, logits_to_keep))
    carried = {f.name for f in dataclasses.fields(output_class)} & {f.name for f in dataclasses.fields(outputs)}
    result = output_class(loss=loss, logits=logits, **{name: getattr(outputs, name) for name in carried - {"loss", "logits"}})
    return result.to_tuple() if return_dict is False else result
