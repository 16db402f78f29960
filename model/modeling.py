"""InternVL3 on packed sequences: InternViT -> pixel unshuffle + MLP projector -> Qwen2.5, with the image rows
placed over the ``<IMG_CONTEXT>`` embeddings and V2PE positions."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import internvl3_engine as engine
from internvl3_engine.parallel import ContextParallel

from .config import InternVL3Config
from .language import LanguageModel, RMSNorm, activation
from .vision import InternViT


@dataclass
class InternVL3Output:
    """``logits`` float [T, V] (None unless asked for, or when no labels were given); ``loss`` the weighted
    cross-entropy sum(w * CE) / sum(w), or as ``loss_reduction`` asked (None without labels);
    ``hidden_states`` the final normed hidden states [T, H] the head reads; ``positions`` the float32 V2PE
    positions [T] the decoder used."""

    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None


class Projector(nn.Module):
    """InternVL's ``mlp1``: pixel unshuffle by r -> LayerNorm(r*r*C) (fused in the engine's
    pixel_unshuffle_layernorm) -> Linear -> GELU -> Linear."""

    def __init__(self, config: InternVL3Config):
        super().__init__()
        width = config.projector_in_features
        self.downsample_ratio = config.projector.downsample_ratio
        self.norm = nn.LayerNorm(width, eps=config.projector.norm_eps)
        self.linear_1 = nn.Linear(width, config.text.hidden_size)
        self.act = activation(config.projector.hidden_act)
        self.linear_2 = nn.Linear(config.text.hidden_size, config.text.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, h, w, C] -> [N * h*w/r^2, H_llm], tile by tile, rows in InternVL's order."""
        rows = engine.pixel_unshuffle_layernorm(
            features, self.norm.weight, self.norm.bias, self.norm.eps, scale_factor=self.downsample_ratio
        )
        # Flattened to [rows, width] before the linears, so that the result is linear_2's own output and
        # not a view of it (FSDP2 warns of returned views: an in-place op on one would skip its all-gather).
        rows = rows.flatten(0, 1)
        return self.linear_2(self.act(self.linear_1(rows)))


INIT_BLOCK_ROWS = 128  # rows of a parameter drawn from one generator in init_weights


def _block_seed(seed: int, name: str, block: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{block}".encode()).digest()[:8], "little")


@torch.no_grad()
def seeded_normal_(parameter: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill ``parameter`` with normal(0, std) values that depend only on (seed, name) and the element's place
    in the whole tensor: rows are drawn in blocks of INIT_BLOCK_ROWS, each from a CPU generator seeded by
    (seed, name, block). A DTensor shard (FSDP2, tensor parallel) draws just the blocks its rows touch and
    takes its slice, so a sharded model gets the values of the whole model initialised in one process."""
    if parameter.device.type == "meta":
        return
    if isinstance(parameter, DTensor):
        local = parameter.to_local()
        chunks = parameter.__create_chunk_list__()  # this rank's piece: its offsets in the whole tensor
        offsets = list(chunks[0].offsets) if chunks else [0] * parameter.dim()
    else:
        local, offsets = parameter, [0] * parameter.dim()
    if local.numel() == 0:
        return
    shape = tuple(parameter.shape)
    start, stop = offsets[0], offsets[0] + local.shape[0]
    blocks = []
    for block in range(start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS + 1):
        rows = min(INIT_BLOCK_ROWS, shape[0] - block * INIT_BLOCK_ROWS)
        generator = torch.Generator().manual_seed(_block_seed(seed, name, block))
        blocks.append(torch.empty((rows, *shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=generator))
    first = start // INIT_BLOCK_ROWS * INIT_BLOCK_ROWS
    values = torch.cat(blocks)[start - first: stop - first]
    for dim in range(1, parameter.dim()):
        values = values.narrow(dim, offsets[dim], local.shape[dim])
    local.copy_(values)


class InternVL3(nn.Module):
    """The InternVL3 model. A client of internvl3_engine's public API; build big presets on the meta device
    (``with torch.device("meta"): InternVL3(config)``) to inspect them without allocating, or to shard them
    before materialising (then ``to_empty`` and ``init_weights`` or a checkpoint load). ``init_seed``: the
    seed of init_weights (None: drawn from torch's global generator)."""

    def __init__(self, config: InternVL3Config, init_seed: Optional[int] = None):
        super().__init__()
        self.config = config
        self.vision = InternViT(config.vision)
        self.projector = Projector(config)
        self.language = LanguageModel(config.text)
        self.init_weights(seed=int(torch.randint(2**62, (), device="cpu")) if init_seed is None else init_seed)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """A fresh initialization for training from scratch: normal(0, std) weights of linear, convolution and
        embedding layers and the position embedding (drawn by seeded_normal_ from (seed, parameter name): the
        same values whether the model is whole or sharded), zero biases and CLS token, unit norms, layer
        scale at its configured value. Parameters on the meta device are left alone."""
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                seeded_normal_(module.weight, prefix + "weight", seed, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        embeddings = self.vision.embeddings
        embeddings.cls_token.zero_()
        seeded_normal_(embeddings.position_embedding, "vision.embeddings.position_embedding", seed, std)
        for layer in self.vision.layers:
            layer.ls1.fill_(self.config.vision.layer_scale_init)
            layer.ls2.fill_(self.config.vision.layer_scale_init)

    # ---- components

    def engine_components(self) -> dict[str, nn.Module]:
        """The three separately sharded parts (the parallelism scheduler's units): the vision tower, the
        projector, and the language model (embeddings, layers, final norm and head)."""
        return {"vision": self.vision, "projector": self.projector, "language": self.language}

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per component and their ``total`` (a tied head is counted once)."""
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in self.engine_components().items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # ---- forward

    def encode_images(self, pixel_values: torch.Tensor, image_flags: Optional[torch.Tensor] = None,
                      context: Optional[ContextParallel] = None) -> torch.Tensor:
        """pixel_values [N_tiles, 3, H, W] -> projected rows [N_tiles * tokens_per_tile, H_llm], tile by tile.
        ``image_flags`` int [N_tiles]: tiles flagged 0 (the blank tile of a text-only pack, which keeps every
        data-parallel rank running the vision tower) are computed and then dropped. ``context``: each rank of
        its group encodes a share of the tiles and the rows are gathered (ContextParallel.encode_split)."""

        def encode(tiles):
            return self.projector(self.vision(tiles))

        rows = context.encode_split(encode, pixel_values) if context is not None else encode(pixel_values)
        if image_flags is None:
            return rows
        per_tile = rows.shape[0] // max(pixel_values.shape[0], 1)
        keep = (image_flags.to(rows.device) != 0).repeat_interleave(per_tile)
        return rows[keep]

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_weights: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        *,
        image_flags: Optional[torch.Tensor] = None,
        return_logits: Optional[bool] = None,
        loss_normalizer: Union[float, torch.Tensor, None] = None,
        loss_reduction: str = "mean",
        context_parallel_group=None,
    ) -> InternVL3Output:
        """One pack of T tokens.

        input_ids int64 [T]; cu_seqlens int32 [B+1] the samples of the pack (None: one sample); max_seqlen the
        longest sample (host int; None: read from cu_seqlens, one host sync); pixel_values [N_tiles, 3, H, W]
        the tiles whose rows replace the ``<IMG_CONTEXT>`` tokens (``config.image_token_id``) in order
        (their number must match: ValueError); positions float32 [T] V2PE positions (None:
        ``v2pe_position_ids`` with delta 1, i.e. 0..L-1 per sample).

        labels int64 [T] are ALREADY ALIGNED: labels[t] is the target predicted at position t (the next
        token), -100 where none; model.data's packing shifts them per sample (``shift_labels``), so the
        model does not shift. loss_weights float32 [T] (e.g. ``internvl3_engine.loss_weights``; None: 1 per
        supervised token, the token mean). loss = sum(w * CE) / sum(w) through the engine's fused linear
        cross-entropy (the [T, V] logits are never materialised for it); ``loss_normalizer`` replaces
        sum(w) (e.g. sum(w) all-reduced over data-parallel ranks). ``loss_reduction``: 'mean' (that loss),
        'sum' (sum(w * CE)) or 'none' (float32 [T] w * CE per token; with loss_weights None the CE itself, 0
        at ignored tokens: the negated log-probabilities of the labels, which MPO sums per response,
        without the [T, V] logits).

        return_logits: compute ``logits`` [T, V]; None means only when no labels are given.

        context_parallel_group: a process group over which the pack's tokens are split (context parallelism;
        every rank of it passes the same whole pack): this rank runs the LLM on its contiguous share of the
        tokens (internvl3_engine.parallel.ContextParallel), attention over the whole pack by Ulysses
        all-to-all. The loss is then this rank's share, sum(w * CE) over its tokens divided by the whole
        pack's normaliser (the group's losses and gradients sum to the pack's); hidden states, logits and
        per-token losses are its tokens'. Each rank of the group encodes a share of the tiles with the vision
        tower; the image rows are gathered and each rank places those its tokens hold.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D [T] (a pack), got shape {tuple(input_ids.shape)}")
        device = input_ids.device
        tokens = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=device)
            if max_seqlen is None:
                max_seqlen = tokens
        elif max_seqlen is None:
            max_seqlen = engine.max_seqlen(cu_seqlens)

        is_visual = input_ids == self.config.image_token_id
        if positions is None:
            positions = engine.v2pe_position_ids(is_visual, cu_seqlens, 1.0)
        context = None
        if context_parallel_group is not None:
            context = ContextParallel.split(context_parallel_group, cu_seqlens, max_seqlen, positions)
        visual_rows = self.encode_images(pixel_values, image_flags, context) if pixel_values is not None else None
        if context is not None:
            if labels is not None and loss_normalizer is None and loss_reduction == "mean":
                # The whole pack's normaliser: sum(w), or the supervised tokens when no weights are given.
                loss_normalizer = (loss_weights.sum() if loss_weights is not None else (labels != -100).sum()).float()
            if visual_rows is not None:  # this rank's tokens hold a contiguous run of the image rows
                before = int(is_visual[: context.shard.start].sum())
                visual_rows = visual_rows[before: before + int(context.local(is_visual, False).sum())]
            input_ids, is_visual, positions = context.local(input_ids), context.local(is_visual, False), context.local(positions)
            labels = context.local(labels, -100) if labels is not None else None
            loss_weights = context.local(loss_weights, 0.0) if loss_weights is not None else None
        hidden, loss, logits = self.language(
            input_ids,
            cu_seqlens,
            max_seqlen,
            positions,
            visual_rows=visual_rows,
            is_visual=is_visual,
            labels=labels,
            loss_weights=loss_weights,
            loss_normalizer=loss_normalizer,
            loss_reduction=loss_reduction,
            return_logits=bool(return_logits or (return_logits is None and labels is None)),
            context_parallel=context,
        )
        return InternVL3Output(logits=logits, loss=loss, hidden_states=hidden, positions=positions)

    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, **options):
        """Greedy, sampled or Best-of-N continuation of one prompt with a KV cache: model.generation.generate."""
        from .generation import generate

        return generate(self, input_ids, pixel_values, **options)

    # ---- checkpoints (model/weights.py)

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
    ) -> "InternVL3":
        """Load a transformers ``InternVLForConditionalGeneration`` folder (config.json + model.safetensors or a
        sharded model.safetensors.index.json) or an original OpenGVLab ``InternVLChatModel`` folder, without
        transformers. ``dtype`` None keeps the checkpoint's."""
        from .weights import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(
        self, path: Union[str, os.PathLike], *, layout: str = "hf", max_shard_size: int = 5 * 1024**3
    ) -> None:
        """Write config.json and safetensors: ``layout`` 'hf' (transformers loads it back with
        InternVLForConditionalGeneration.from_pretrained) or 'opengvlab' (InternVLChatModel's names);
        shards of at most ``max_shard_size`` bytes with an index when bigger."""
        from .weights import save_pretrained

        save_pretrained(self, path, layout=layout, max_shard_size=max_shard_size)
