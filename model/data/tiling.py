"""InternVL's dynamic tiling of an image into square tiles, ImageNet normalisation, JPEG augmentation.

An image is matched to the grid of ``cols x rows`` tiles (min_num <= cols*rows <= max_num) whose aspect
ratio cols/rows is closest to its width/height, resized to (tile*cols, tile*rows), cut row-major into
tiles, and followed by a thumbnail of the whole image when the grid has more than one tile.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TILE_SIZE = 448
JPEG_QUALITY_RANGE = (75, 100)


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """Grids (cols, rows) with min_num <= cols*rows <= max_num, ordered by cols*rows.

    InternVL builds these as a Python set and sorts it by area; grids of equal area then keep the set's
    iteration order (deterministic for tuples of small ints in CPython). That order only matters for
    an exact tie between two grids of the same area, and building the same set reproduces it.
    """
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = {
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile_size: int = DEFAULT_TILE_SIZE) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to width/height. On an exact tie with the best so far, a
    later (larger) grid wins when the image area exceeds half that grid's pixel area, so a big image
    gets more tiles than a small one of the same shape."""
    aspect = width / height
    area = width * height
    best_grid = (1, 1)
    best_diff = math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best_grid = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


def tile_image(
    image: Image.Image,
    tile_size: int = DEFAULT_TILE_SIZE,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """The tiles (row-major) of an RGB image, then its thumbnail when there is more than one tile."""
    width, height = image.size
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.BICUBIC)
    tiles = []
    for index in range(cols * rows):
        left = (index % cols) * tile_size
        top = (index // cols) * tile_size
        tiles.append(resized.crop((left, top, left + tile_size, top + tile_size)))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return tiles


def normalize_tiles(tiles: list[Image.Image]) -> torch.Tensor:
    """float32 [tiles, 3, H, W]: pixels scaled to [0, 1], then ImageNet mean and std per channel."""
    array = np.stack([np.asarray(tile.convert("RGB"), dtype=np.float32) for tile in tiles]) / 255.0
    array = (array - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def jpeg_reencode(image: Image.Image, rng: random.Random) -> Image.Image:
    """The image after a JPEG round trip at a quality drawn from 75..100 (InternVL's training augmentation)."""
    quality = rng.randint(*JPEG_QUALITY_RANGE)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file, from its header (the pixels are not decoded)."""
    with Image.open(path) as opened:
        return opened.size


def load_image(path: str) -> Image.Image:
    """An RGB copy of the image file (the file is closed on return; corrupt files raise)."""
    with Image.open(path) as opened:
        opened.load()
        return opened.convert("RGB")


@dataclass(frozen=True)
class ImageTiler:
    """Settings of the image pipeline: an image becomes float32 [tiles, 3, tile_size, tile_size]."""

    tile_size: int = DEFAULT_TILE_SIZE
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True

    def __post_init__(self):
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        candidate_grids(self.min_num, self.max_num)  # validates the range

    def for_images(self, count: int) -> "ImageTiler":
        """The tiler of each image of a sample with ``count`` images: InternVL divides the tile budget among
        them (max_num // count tiles each, at least min_num)."""
        if count <= 1:
            return self
        return dataclasses.replace(self, max_num=max(self.min_num, self.max_num // count))

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles of an image of width x height pixels (its grid, plus the thumbnail), without decoding it."""
        cols, rows = closest_grid(width, height, candidate_grids(self.min_num, self.max_num), self.tile_size)
        return cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)

    def max_tiles_per_image(self) -> int:
        return self.max_num + (1 if self.use_thumbnail and self.max_num > 1 else 0)

    def __call__(self, image: Image.Image, augment_rng: Optional[random.Random] = None) -> torch.Tensor:
        """Tiles of ``image``; with ``augment_rng`` the image first takes a seeded JPEG round trip."""
        image = image.convert("RGB")
        if augment_rng is not None:
            image = jpeg_reencode(image, augment_rng)
        return normalize_tiles(tile_image(image, self.tile_size, self.min_num, self.max_num, self.use_thumbnail))
