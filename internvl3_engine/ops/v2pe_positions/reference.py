"""Plain PyTorch reference of v2pe_position_ids: the executable spec every backend is tested against."""

from __future__ import annotations

import math

import torch


def _delta_count_error(num_deltas: int, num_images: int) -> ValueError:
    return ValueError(f"delta must have one entry per image: got {num_deltas} deltas for {num_images} images")


def image_starts(is_visual: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """bool [T]: the first token of each image (a maximal run of visual tokens inside one segment)."""
    bounds = cu_seqlens.to(torch.int64)
    follows_visual = torch.zeros_like(is_visual)
    follows_visual[1:] = is_visual[:-1]
    segment_firsts = bounds[:-1][bounds[:-1] < is_visual.shape[0]]  # empty segments at the end have none
    follows_visual[segment_firsts] = False  # a run crossing a segment boundary is two images
    return is_visual & ~follows_visual


def check_delta_count(is_visual: torch.Tensor, cu_seqlens: torch.Tensor, delta_per_image: torch.Tensor) -> None:
    """ValueError unless ``delta_per_image`` has one entry per image of the pack."""
    num_images = int(image_starts(is_visual, cu_seqlens).sum())
    if delta_per_image.shape[0] != num_images:
        raise _delta_count_error(delta_per_image.shape[0], num_images)


def v2pe_positions_reference(
    is_visual: torch.Tensor, cu_seqlens: torch.Tensor, delta_per_image: torch.Tensor | None, delta_scalar: float
) -> torch.Tensor:
    """V2PE positions, float32 [T], of a pack of segments (``cu_seqlens`` int32 [B+1]).

    Per segment pos starts at -1. A text token takes pos + 1 (and pos becomes that). A maximal run of n
    visual tokens inside a segment is one image; its k-th token (k = 1..n) takes pos + k * delta, after
    which pos = ceil(pos + n * delta). Images are numbered across the pack in order of appearance; image i
    uses ``delta_per_image[i]`` when given, else ``delta_scalar`` (both in (0, 1]).

    Arithmetic: pos before an image is an integer; pos + k * delta and ceil(pos + n * delta) are computed
    in float64 (multiply, then add, each rounded once; delta is float64 of the float32 or Python value) and
    a token's position is rounded to float32 once. The compiled kernels do the same operations.

    Only each image's end position needs a sequential scan (it depends, through the rounding of the
    float64 sum, on the position before it); that scan runs over images on the host, everything per token
    is vectorised.
    """
    device = is_visual.device
    bounds = cu_seqlens.to(torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    segment = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths)
    segment_start = bounds[segment]  # first token of each token's segment

    starts_image = image_starts(is_visual, cu_seqlens)
    image_start = torch.nonzero(starts_image).flatten()
    num_images = image_start.shape[0]
    visual_token = torch.nonzero(is_visual).flatten()
    image_of_visual_token = torch.cumsum(starts_image, 0)[visual_token] - 1
    image_length = torch.bincount(image_of_visual_token, minlength=num_images)

    if delta_per_image is not None:
        if delta_per_image.shape[0] != num_images:
            raise _delta_count_error(delta_per_image.shape[0], num_images)
        image_delta = delta_per_image.to(torch.float64)
    else:
        image_delta = torch.full((num_images,), float(delta_scalar), dtype=torch.float64, device=device)

    # Text tokens of its segment before each image: its offset in the segment minus the visual tokens
    # of the segment before it.
    visual_before = torch.cumsum(is_visual, 0) - is_visual.to(torch.int64)
    visual_before_in_segment = visual_before - visual_before[segment_start]
    text_before_image = image_start - segment_start[image_start] - visual_before_in_segment[image_start]

    # The sequential part, in Python integers and IEEE float64 (no fused multiply-add): pos before each
    # image, and the integer advance ceil(pos + n * delta) - pos the image makes.
    position_before_image, advance = [], []
    advances_in_segment, current_segment = 0, None
    for seg, text_before, n, delta in zip(
        segment[image_start].tolist(), text_before_image.tolist(), image_length.tolist(), image_delta.tolist()
    ):
        if seg != current_segment:
            advances_in_segment, current_segment = 0, seg
        pos = -1 + text_before + advances_in_segment
        step = math.ceil(float(pos) + n * delta) - pos
        position_before_image.append(pos)
        advance.append(step)
        advances_in_segment += step

    # Text token: pos after it = -1 + the sum over its segment, up to and including it, of per-token
    # advances (1 for a text token, the image's advance on an image's first token, 0 on its other tokens).
    token_advance = (~is_visual).to(torch.int64)
    token_advance[image_start] = torch.tensor(advance, dtype=torch.int64, device=device)
    advanced = torch.cumsum(token_advance, 0)
    advanced_before_segment = advanced[segment_start] - token_advance[segment_start]
    positions = (advanced - advanced_before_segment - 1).to(torch.float64)

    # Visual token k (1-based) of image i: pos_before_i + k * delta_i.
    k = (visual_token - image_start[image_of_visual_token] + 1).to(torch.float64)
    before = torch.tensor(position_before_image, dtype=torch.float64, device=device)
    positions[visual_token] = before[image_of_visual_token] + k * image_delta[image_of_visual_token]
    return positions.to(torch.float32)
