"""Dynamic tiling against hand-computed grids, tile order, thumbnails, normalisation, JPEG augmentation."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTiler,
    candidate_grids,
    closest_grid,
    jpeg_reencode,
    tile_image,
)

# Threshold of the tie-break for a grid of n tiles: area > 0.5 * 448^2 * n = 100352 * n.
GRID_CASES = [
    # 448x448, aspect 1: (1,1) exact; (2,2) ties but 200704 <= 401408 -> (1,1).
    ((448, 448), (1, 1)),
    # 500x500, aspect 1: 250000 <= 401408 -> (1,1).
    ((500, 500), (1, 1)),
    # 800x800: (2,2) ties and 640000 > 401408 -> (2,2); (3,3) needs > 903168 -> no.
    ((800, 800), (2, 2)),
    # 1000x1000: (2,2) then (3,3) (1e6 > 903168); (4,4) is 16 > 12 tiles -> (3,3).
    ((1000, 1000), (3, 3)),
    # 1000x500, aspect 2: (2,1) exact; (4,2) ties but 500000 <= 802816 -> (2,1).
    ((1000, 500), (2, 1)),
    # 2000x1000: 2e6 > 802816 -> (4,2); (6,3) is 18 > 12 tiles.
    ((2000, 1000), (4, 2)),
    # 672x448, aspect 1.5: (3,2) matches exactly (a tie of (1,1) and (2,1) earlier is superseded).
    ((672, 448), (3, 2)),
    # 100x1000, aspect 0.1: (1,10) matches exactly.
    ((100, 1000), (1, 10)),
    # 5000x100, aspect 50: the widest grid (12,1).
    ((5000, 100), (12, 1)),
    # Aspect 3.5 lies exactly halfway between 3 and 4, and no grid of <= 12 tiles lies between (7/2 needs
    # 14): (3,1), (4,1) and (6,2) all differ by 0.5, in that order of area.
    # 700x200, area 140000: (4,1) needs > 401408 -> stays (3,1).
    ((700, 200), (3, 1)),
    # 1400x400, area 560000: > 401408 -> (4,1); (6,2) needs > 1204224 -> no.
    ((1400, 400), (4, 1)),
    # 2800x800, area 2240000: > 1204224 -> (6,2).
    ((2800, 800), (6, 2)),
]


@pytest.mark.parametrize("size,grid", GRID_CASES)
def test_closest_grid_hand_computed(size, grid):
    assert closest_grid(*size, candidate_grids(1, 12), 448) == grid


def test_candidate_grids():
    grids = candidate_grids(1, 12)
    # sum over cols of floor(12 / cols) = 12+6+4+3+2+2+1+1+1+1+1+1
    assert len(grids) == 35 == len(set(grids))
    areas = [cols * rows for cols, rows in grids]
    assert areas == sorted(areas) and areas[0] == 1 and areas[-1] == 12
    assert all(4 <= a <= 6 for a in (c * r for c, r in candidate_grids(4, 6)))
    with pytest.raises(ValueError):
        candidate_grids(3, 2)


def test_max_num_limits_grid():
    # 1000x1000 with at most 6 tiles: (3,3) is out of range -> (2,2).
    assert closest_grid(1000, 1000, candidate_grids(1, 6), 448) == (2, 2)
    # min_num=2 forbids (1,1): a square 448 image takes (2,2), the only square grid in 2..12 below 9.
    assert closest_grid(448, 448, candidate_grids(2, 12), 448) == (2, 2)


@pytest.mark.parametrize("size,grid", [((448, 448), (1, 1)), ((800, 800), (2, 2)), ((1400, 400), (4, 1))])
def test_tile_counts_and_thumbnail(size, grid):
    tiles = tile_image(Image.new("RGB", size, (10, 20, 30)))
    expected = grid[0] * grid[1]
    assert len(tiles) == expected + (1 if expected > 1 else 0)
    assert all(tile.size == (448, 448) for tile in tiles)
    assert len(tile_image(Image.new("RGB", size), use_thumbnail=False)) == expected


def test_tiles_row_major():
    # 896x896 -> (2,2): quadrants TL red, TR green, BL blue, BR white, then the thumbnail.
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    image = Image.new("RGB", (896, 896))
    for index, color in enumerate(colors):
        image.paste(color, ((index % 2) * 448, (index // 2) * 448, (index % 2) * 448 + 448, (index // 2) * 448 + 448))
    tiles = tile_image(image)
    assert len(tiles) == 5
    for tile, color in zip(tiles, colors):
        assert tile.getpixel((224, 224)) == color
    thumbnail = tiles[4]
    assert thumbnail.getpixel((5, 5)) == colors[0] and thumbnail.getpixel((440, 440)) == colors[3]


def test_normalization_constant_image():
    pixels = ImageTiler()(Image.new("RGB", (448, 448), (128, 64, 255)))
    assert pixels.shape == (1, 3, 448, 448) and pixels.dtype == torch.float32
    for channel, value in enumerate((128, 64, 255)):
        expected = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(pixels[0, channel], torch.full((448, 448), expected), atol=1e-6, rtol=0)


def test_small_tile_size():
    tiler = ImageTiler(tile_size=28, max_num=6)
    pixels = tiler(Image.new("RGB", (60, 30)))  # aspect 2, area 1800 <= 0.5*28^2*8 -> (2,1) + thumbnail
    assert pixels.shape == (3, 3, 28, 28)
    assert tiler.max_tiles_per_image() == 7


def test_jpeg_augmentation_seeded():
    rng_image = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    image = Image.fromarray(rng_image)
    tiler = ImageTiler(tile_size=56)
    first = tiler(image, random.Random(7))
    again = tiler(image, random.Random(7))
    assert torch.equal(first, again)
    assert not torch.equal(first, tiler(image))  # the JPEG round trip changes a noisy image
    reencoded = jpeg_reencode(image, random.Random(3))
    assert reencoded.size == image.size and reencoded.mode == "RGB"
