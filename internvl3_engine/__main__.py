"""Command line: ``python -m internvl3_engine info`` and ``python -m internvl3_engine demo``."""

from __future__ import annotations

import json
import sys
import time

import torch

import internvl3_engine as ie
from internvl3_engine.cli import ArgumentParser, run_command
from internvl3_engine.dispatch import why_unusable


def _info(_args) -> int:
    print(json.dumps(ie.info(), indent=2))
    return 0


def _demo_pack(device: torch.device, generator: torch.Generator):
    """A pack of two samples as InternVL3 builds them: sample 0 has text, one image of two tiles and text;
    sample 1 is text only. Tiny ViT features stand in for InternViT's 32x32 grid."""
    grid, vit_width, llm_width, heads, head_dim = 8, 16, 32, 4, 16
    tiles = 2
    tokens_per_tile = (grid // 2) ** 2
    sample0 = [False] * 5 + [True] * (tiles * tokens_per_tile) + [False] * 7
    sample1 = [False] * 9
    is_visual = torch.tensor(sample0 + sample1, device=device)
    pack = ie.pack_lengths([len(sample0), len(sample1)], device=device)
    features = torch.randn(tiles, grid, grid, vit_width, device=device, generator=generator)
    labels = torch.randint(0, 1000, (pack.total_tokens,), device=device, generator=generator)
    labels[is_visual] = -100  # image tokens are never supervised
    labels[:3] = -100  # nor the prompt
    return dict(
        pack=pack,
        is_visual=is_visual,
        features=features,
        norm_weight=torch.randn(4 * vit_width, device=device, generator=generator),
        norm_bias=torch.randn(4 * vit_width, device=device, generator=generator),
        projector=torch.randn(4 * vit_width, llm_width, device=device, generator=generator) / 8,
        text_embeds=torch.randn(pack.total_tokens, llm_width, device=device, generator=generator),
        queries=torch.randn(pack.total_tokens, heads, head_dim, device=device, generator=generator),
        keys=torch.randn(pack.total_tokens, heads // 2, head_dim, device=device, generator=generator),
        values=torch.randn(pack.total_tokens, heads // 2, head_dim, device=device, generator=generator),
        head=torch.randn(1000, llm_width, device=device, generator=generator) / 8,
        labels=labels,
    )


def _run_ops(batch, delta: float):
    """One pass through every op of the engine on InternVL3's data path (GQA attention with V2PE rotary
    inside, the LM head's loss over the scattered embeddings); returns each op's output by name."""
    pack = batch["pack"]
    positions = ie.v2pe_position_ids(batch["is_visual"], pack.cu_seqlens, delta)
    unshuffled = ie.pixel_unshuffle(batch["features"])
    normed = ie.pixel_unshuffle_layernorm(batch["features"], batch["norm_weight"], batch["norm_bias"])
    visual_embeds = normed.flatten(0, 1) @ batch["projector"]
    embeds = ie.scatter_visual(batch["text_embeds"], visual_embeds, batch["is_visual"])
    rotated = ie.apply_rotary(batch["queries"], positions)
    attention = ie.v2pe_attention(batch["queries"], batch["keys"], batch["values"], pack.cu_seqlens, pack.max_seqlen, positions)
    weights = ie.loss_weights(batch["labels"], pack.cu_seqlens, mode="square")
    loss = ie.linear_cross_entropy(embeds, batch["head"], batch["labels"], loss_weights=weights)
    return {
        "v2pe_position_ids": positions,
        "pixel_unshuffle": unshuffled,
        "pixel_unshuffle_layernorm": normed,
        "scatter_visual": embeds,
        "apply_rotary": rotated,
        "v2pe_attention": attention,
        "loss_weights": weights,
        "linear_cross_entropy": loss,
    }


def _kernel_sets() -> dict:
    """Each demo op's KernelSet, to say which backend ran it."""
    from .ops.attention.op import V2PE_ATTENTION
    from .ops.linear_cross_entropy.op import LINEAR_CROSS_ENTROPY
    from .ops.loss_weights.op import LOSS_WEIGHTS
    from .ops.pixel_unshuffle.op import PIXEL_UNSHUFFLE, PIXEL_UNSHUFFLE_LAYERNORM
    from .ops.rotary.op import ROTARY
    from .ops.scatter_visual.op import SCATTER_VISUAL
    from .ops.v2pe_positions.op import V2PE_POSITIONS

    return {"v2pe_position_ids": V2PE_POSITIONS, "pixel_unshuffle": PIXEL_UNSHUFFLE, "pixel_unshuffle_layernorm": PIXEL_UNSHUFFLE_LAYERNORM,
            "scatter_visual": SCATTER_VISUAL, "apply_rotary": ROTARY, "v2pe_attention": V2PE_ATTENTION, "loss_weights": LOSS_WEIGHTS,
            "linear_cross_entropy": LINEAR_CROSS_ENTROPY}


def _demo(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (use --device cpu)")
    if args.backend != "auto":
        reason = why_unusable(args.backend, device)
        if reason is not None:
            raise ValueError(f"--backend {args.backend} cannot run on {device.type}: {reason}")
    generator = torch.Generator(device=device).manual_seed(0)
    batch = _demo_pack(device, generator)
    print(f"internvl3_engine {ie.__version__} demo on {device}: a pack of {batch['pack'].num_sequences} samples, "
          f"{batch['pack'].total_tokens} tokens, {int(batch['is_visual'].sum())} visual")
    with ie.backend("torch"):
        expected = _run_ops(batch, args.delta)
    with ie.backend(args.backend):
        start = time.perf_counter()
        outputs = _run_ops(batch, args.delta)
        elapsed = time.perf_counter() - start
        ran = {name: kernels.chosen(device) for name, kernels in _kernel_sets().items()}
    sample0 = int(batch["pack"].cu_seqlens[1])
    print(f"V2PE positions of sample 0 (delta {args.delta}): {outputs['v2pe_position_ids'][:sample0].tolist()}")
    print(f"square loss weights of sample 0: {outputs['loss_weights'][:sample0].tolist()}")
    print(f"\n{'op':<28}{'backend':<10}{'shape':<18}{'max |error| vs reference':>26}")
    worst = 0.0
    for name, output in outputs.items():
        error = (output.double() - expected[name].double()).abs().max().item() if output.numel() else 0.0
        worst = max(worst, error)
        print(f"{name:<28}{ran[name]:<10}{str(tuple(output.shape)):<18}{error:>26.3g}")
    print(f"\nbackend {args.backend!r} asked for ('cuda' is the compiled extension: its CUDA kernels on a GPU, its C++ "
          f"kernels on the CPU); all {len(outputs)} ops in {elapsed * 1e3:.1f} ms")
    if worst > 1e-4:
        print(f"error above 1e-4: {worst:.3g}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m internvl3_engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, compiled extension, GPU").set_defaults(run=_info)
    demo = commands.add_parser("demo", help="run every op on a small InternVL3-style pack and check it")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--backend", default="auto", choices=ie.BACKENDS)
    demo.add_argument("--delta", type=float, default=0.25, help="V2PE delta for the image")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
