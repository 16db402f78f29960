"""Command line of the reference model.

    python -m model info --preset internvl3-78b     parameter counts per component, built on the meta device
    python -m model info --config path/to/folder    the same for a checkpoint's config.json
    python -m model convert SOURCE TARGET [--layout hf|opengvlab]
                                                    a checkpoint folder rewritten in a layout (transformers'
                                                    by default, which a sharded start reads)
"""

from __future__ import annotations

import json
import sys

import torch
from internvl3_engine.cli import ArgumentParser, run_command

from .config import PRESETS, InternVL3Config


def _info(args) -> int:
    config = InternVL3Config.from_hf(args.config) if args.config else InternVL3Config.preset(args.preset)
    from .modeling import InternVL3

    # The meta device holds shapes only: even the 78B preset allocates nothing.
    with torch.device("meta"):
        model = InternVL3(config)
    counts = model.num_parameters()
    if args.json:
        print(json.dumps({"name": config.name, "tokens_per_tile": config.tokens_per_tile, "parameters": counts}))
        return 0
    v, t = config.vision, config.text
    print(f"{config.name}")
    print(
        f"  vision    InternViT: hidden {v.hidden_size}, {v.num_layers} layers, {v.num_heads} heads, MLP "
        f"{v.intermediate_size}, {v.norm_type}{', QK-norm' if v.qk_norm else ''}, tile {v.image_size} / patch {v.patch_size}"
    )
    print(f"  projector pixel unshuffle x{config.projector.factor} -> {config.projector_in_features} -> {t.hidden_size}, "
          f"{config.tokens_per_tile} tokens a tile")
    print(
        f"  language  Qwen2.5: hidden {t.hidden_size}, {t.num_layers} layers, {t.num_heads} q / {t.num_kv_heads} kv heads, "
        f"FFN {t.intermediate_size}, vocab {t.vocab_size}, theta {t.rope_theta:g}, "
        f"{'tied' if t.tie_word_embeddings else 'untied'} head"
    )
    print("parameters")
    for name in ("vision", "projector", "language", "total"):
        print(f"  {name:<10}{counts[name]:>16,}  ({counts[name] / 1e9:.3f} B)")
    return 0


def _convert(args) -> int:
    from .modeling import InternVL3

    model = InternVL3.from_pretrained(args.source)
    model.save_pretrained(args.target, layout=args.layout)
    print(f"{args.source} -> {args.target} ({args.layout} layout)")
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m model", description="InternVL3 reference model")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="parameter counts per component (meta device, nothing allocated)")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="tiny")
    source.add_argument("--config", help="a checkpoint folder or config.json (transformers or OpenGVLab)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    convert = commands.add_parser("convert", help="rewrite a checkpoint folder in another layout")
    convert.add_argument("source", help="a checkpoint folder (transformers or OpenGVLab layout)")
    convert.add_argument("target", help="the folder to write")
    convert.add_argument("--layout", choices=("hf", "opengvlab"), default="hf")
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _info(args) if args.command == "info" else _convert(args))


if __name__ == "__main__":
    sys.exit(main())
