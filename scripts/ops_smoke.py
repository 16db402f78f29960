"""Run every public op once, forward and backward, on every backend present for a device: the workload that
compute-sanitizer (memcheck, racecheck) checks on a GPU. Sizes are small but not multiples of any block
size, with an empty and a length-1 segment, so that bound checks are exercised. Prints one line per op and
backend; exits non-zero on the first failure.

    python scripts/ops_smoke.py --device cuda
    compute-sanitizer --tool memcheck python scripts/ops_smoke.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

import internvl3_engine as ie
from internvl3_engine.dispatch import why_unusable
from internvl3_engine.ops.attention import ROTARY_MODES


def make_cases(device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (function of the leaves, leaves needing grad)."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(grad)

    lengths = [37, 0, 1, 90]
    cu_seqlens = ie.cu_seqlens_from_lengths(lengths, device=device)
    tokens = sum(lengths)
    is_visual = torch.zeros(tokens, dtype=torch.bool)
    is_visual[5:21] = True
    is_visual[60:92] = True
    is_visual = is_visual.to(device)
    positions = ie.v2pe_position_ids(is_visual, cu_seqlens, 0.25)
    labels = torch.randint(0, 50, (tokens,), generator=generator).to(device)
    labels[::7] = -100
    tiles = randn(3, 8, 8, 24)
    width = 4 * 24
    return {
        "v2pe_position_ids": (lambda: ie.v2pe_position_ids(is_visual, cu_seqlens, 0.5), []),
        "loss_weights": (lambda: ie.loss_weights(labels, cu_seqlens), []),
        "apply_rotary": (lambda x: ie.apply_rotary(x, positions), [randn(tokens, 3, 40)]),
        "pixel_unshuffle": (lambda x: ie.pixel_unshuffle(x), [tiles]),
        "pixel_unshuffle_layernorm": (lambda x, w, b: ie.pixel_unshuffle_layernorm(x, w, b), [tiles, randn(width), randn(width)]),
        "scatter_visual": (lambda text, visual: ie.scatter_visual(text, visual, is_visual),
                           [randn(tokens, 24), randn(int(is_visual.sum()), 24)]),
        **{f"v2pe_attention[{mode}]": (
            lambda q, k, v, mode=mode: ie.v2pe_attention(q, k, v, cu_seqlens, max(lengths), positions, rotary_mode=mode),
            [randn(tokens, 6, 64), randn(tokens, 2, 64), randn(tokens, 2, 64)],
        ) for mode in ROTARY_MODES},
        "linear_cross_entropy": (lambda hidden, weight: ie.linear_cross_entropy(hidden, weight, labels),
                                 [randn(tokens, 48), randn(50, 48)]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for kind in ("torch", "triton", "cuda"):
        if why_unusable(kind, device) is not None:
            print(f"{kind}: skipped ({why_unusable(kind, device)})")
            continue
        for name, (function, leaves) in make_cases(device, dtype).items():
            with ie.backend(kind):
                out = function(*leaves)
                if leaves:
                    out.float().square().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"{kind:6s} {name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
