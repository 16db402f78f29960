"""Command line: ``python -m internvl3_engine info`` and ``python -m internvl3_engine demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import internvl3_engine as ie


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
        labels=labels,
    )


def _run_ops(batch, delta: float):
    """One pass through the ops of InternVL3's data path; returns each op's output by name."""
    pack = batch["pack"]
    positions = ie.v2pe_position_ids(batch["is_visual"], pack.cu_seqlens, delta)
    normed = ie.pixel_unshuffle_layernorm(batch["features"], batch["norm_weight"], batch["norm_bias"])
    visual_embeds = normed.flatten(0, 1) @ batch["projector"]
    embeds = ie.scatter_visual(batch["text_embeds"], visual_embeds, batch["is_visual"])
    rotated = ie.apply_rotary(batch["queries"], positions)
    weights = ie.loss_weights(batch["labels"], pack.cu_seqlens, mode="square")
    return {
        "v2pe_position_ids": positions,
        "pixel_unshuffle_layernorm": normed,
        "scatter_visual": embeds,
        "apply_rotary": rotated,
        "loss_weights": weights,
    }


def _demo(args) -> int:
    device = torch.device(args.device)
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
    sample0 = int(batch["pack"].cu_seqlens[1])
    print(f"V2PE positions of sample 0 (delta {args.delta}): {outputs['v2pe_position_ids'][:sample0].tolist()}")
    print(f"square loss weights of sample 0: {outputs['loss_weights'][:sample0].tolist()}")
    print(f"\n{'op':<28}{'shape':<18}{'max |error| vs reference':>26}")
    worst = 0.0
    for name, output in outputs.items():
        error = (output.double() - expected[name].double()).abs().max().item() if output.numel() else 0.0
        worst = max(worst, error)
        print(f"{name:<28}{str(tuple(output.shape)):<18}{error:>26.3g}")
    print(f"\nbackend {args.backend!r}, all five ops in {elapsed * 1e3:.1f} ms")
    if worst > 1e-4:
        print(f"error above 1e-4: {worst:.3g}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internvl3_engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, compiled extension, GPU").set_defaults(run=_info)
    demo = commands.add_parser("demo", help="run every op on a small InternVL3-style pack and check it")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--backend", default="auto", choices=ie.BACKENDS)
    demo.add_argument("--delta", type=float, default=0.25, help="V2PE delta for the image")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
