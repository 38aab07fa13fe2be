"""Slicing of high-resolution images: grids, sizes and pixels equal the official MiniCPM-V 2.0 ones.

Expected values below were produced by the OFFICIAL release's `slice_image` (openbmb/MiniCPM-V-2,
modeling_minicpmv.py at 3d0e971: slice_image / find_best_resize / get_refine_size /
split_to_patches, run unmodified in a separate venv with Pillow 12.3) and pasted as literals.
Each row is `(width, height) -> (source size, (cols, rows) or None, cell size or None)`.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from conftest import EXAMPLES
from PIL import Image

from axolotl_minicpmv.model.slicing import best_grid_for, slice_image, slice_sizes

# Official outputs (max_slice_nums=9, scale_resolution=448, patch_size=14) for hand-picked sizes:
# tiny, huge, extreme aspect ratios, and the boundaries around one/two/four/nine 448x448 tiles.
OFFICIAL_FIXED = [
    ((1, 1), ((448, 448), None, None)),
    ((5, 3), ((574, 350), None, None)),
    ((3, 5), ((350, 574), None, None)),
    ((14, 14), ((448, 448), None, None)),
    ((4000, 3000), ((518, 392), (3, 3), (518, 392))),
    ((3000, 4000), ((392, 518), (3, 3), (392, 518))),
    ((1, 3000), ((14, 24542), None, None)),
    ((3000, 1), ((23996, 14), None, None)),
    ((8000, 200), ((2800, 70), (9, 1), (938, 210))),
    ((200, 8000), ((70, 2828), (1, 9), (210, 938))),
    ((448, 448), ((448, 448), None, None)),
    ((448, 449), ((448, 448), (1, 2), (630, 322))),
    ((449, 448), ((448, 448), (2, 1), (322, 630))),
    ((896, 448), ((630, 322), (2, 1), (448, 448))),
    ((448, 896), ((322, 630), (1, 2), (448, 448))),
    ((1344, 896), ((546, 364), (3, 2), (448, 448))),
    ((1344, 1344), ((448, 448), (3, 3), (448, 448))),
    ((447, 447), ((448, 448), None, None)),
    ((640, 480), ((518, 392), (2, 1), (364, 546))),
    ((1920, 1080), ((602, 336), (4, 2), (420, 476))),
    ((1080, 1920), ((336, 602), (2, 4), (476, 420))),
    ((1024, 1024), ((448, 448), (3, 2), (364, 546))),  # (2,3)/(3,2) tie broken by float log
    ((100, 2000), ((98, 2002), None, None)),
    ((2000, 100), ((2002, 98), None, None)),
    ((634, 634), ((448, 448), (2, 2), (448, 448))),
    ((635, 635), ((448, 448), (2, 2), (448, 448))),
]

# Official outputs for 32 sizes drawn with random.Random(20240601), log-uniform in [8, 5000] per side.
OFFICIAL_RANDOM = [
    ((17, 119), ((168, 1190), None, None)),
    ((1252, 343), ((854, 238), (4, 1), (420, 462))),
    ((1941, 122), ((1778, 112), (3, 1), (1022, 196))),
    ((29, 131), ((210, 952), None, None)),
    ((91, 13), ((1176, 168), None, None)),
    ((4260, 2507), ((588, 336), (4, 2), (406, 490))),
    ((1632, 312), ((1022, 196), (4, 1), (504, 392))),
    ((69, 18), ((868, 224), None, None)),
    ((2331, 350), ((1148, 168), (6, 1), (476, 420))),
    ((18, 3576), ((28, 6314), None, None)),
    ((2653, 350), ((1232, 168), (6, 1), (504, 392))),
    ((283, 2283), ((154, 1274), (1, 5), (350, 574))),
    ((537, 86), ((1120, 182), None, None)),
    ((10, 4916), ((14, 9940), None, None)),
    ((300, 30), ((1414, 140), None, None)),
    ((11, 1658), ((42, 5502), None, None)),
    ((43, 29), ((546, 364), None, None)),
    ((44, 34), ((504, 392), None, None)),
    ((1887, 72), ((2282, 84), None, None)),
    ((3431, 115), ((2450, 84), (3, 1), (1414, 140))),
    ((4152, 20), ((6440, 28), None, None)),
    ((49, 40), ((490, 406), None, None)),
    ((128, 8), ((1792, 112), None, None)),
    ((30, 91), ((252, 784), None, None)),
    ((115, 663), ((182, 1078), None, None)),
    ((28, 62), ((294, 672), None, None)),
    ((2073, 3111), ((364, 546), (2, 4), (518, 392))),
    ((34, 603), ((112, 1890), None, None)),
    ((1257, 559), ((672, 294), (3, 1), (392, 518))),
    ((1251, 95), ((1624, 126), None, None)),
    ((120, 1581), ((126, 1624), None, None)),
    ((1701, 24), ((3752, 56), None, None)),
]

# Official outputs with max_slice_nums = 1..9 (ties such as 1344x1344 with 2 slices: first grid wins).
OFFICIAL_MAX_SLICE = [
    ((4000, 3000), 1, ((518, 392), None, None)),
    ((4000, 3000), 2, ((518, 392), (2, 1), (364, 546))),
    ((4000, 3000), 3, ((518, 392), (2, 1), (364, 546))),
    ((4000, 3000), 4, ((518, 392), (2, 2), (518, 392))),
    ((4000, 3000), 5, ((518, 392), (2, 2), (518, 392))),
    ((4000, 3000), 6, ((518, 392), (3, 2), (420, 476))),
    ((4000, 3000), 7, ((518, 392), (3, 2), (420, 476))),
    ((4000, 3000), 8, ((518, 392), (4, 2), (364, 546))),
    ((4000, 3000), 9, ((518, 392), (3, 3), (518, 392))),
    ((1920, 1080), 1, ((602, 336), None, None)),
    ((1920, 1080), 2, ((602, 336), (2, 1), (420, 476))),
    ((1920, 1080), 3, ((602, 336), (2, 1), (420, 476))),
    ((1920, 1080), 4, ((602, 336), (3, 1), (350, 588))),
    ((1920, 1080), 5, ((602, 336), (2, 2), (602, 336))),
    ((1920, 1080), 6, ((602, 336), (3, 2), (490, 406))),
    ((1920, 1080), 7, ((602, 336), (3, 2), (490, 406))),
    ((1920, 1080), 8, ((602, 336), (4, 2), (420, 476))),
    ((1920, 1080), 9, ((602, 336), (4, 2), (420, 476))),
    ((8000, 200), 1, ((2800, 70), None, None)),
    ((8000, 200), 2, ((2800, 70), (2, 1), (2002, 98))),
    ((8000, 200), 3, ((2800, 70), (3, 1), (1624, 126))),
    ((8000, 200), 4, ((2800, 70), (4, 1), (1414, 140))),
    ((8000, 200), 5, ((2800, 70), (5, 1), (1260, 154))),
    ((8000, 200), 6, ((2800, 70), (6, 1), (1148, 168))),
    ((8000, 200), 7, ((2800, 70), (7, 1), (1064, 182))),
    ((8000, 200), 8, ((2800, 70), (8, 1), (994, 196))),
    ((8000, 200), 9, ((2800, 70), (9, 1), (938, 210))),
    ((1344, 1344), 1, ((448, 448), None, None)),
    ((1344, 1344), 2, ((448, 448), (1, 2), (630, 322))),
    ((1344, 1344), 3, ((448, 448), (1, 2), (630, 322))),
    ((1344, 1344), 4, ((448, 448), (2, 2), (448, 448))),
    ((1344, 1344), 5, ((448, 448), (2, 2), (448, 448))),
    ((1344, 1344), 6, ((448, 448), (3, 2), (364, 546))),
    ((1344, 1344), 7, ((448, 448), (3, 2), (364, 546))),
    ((1344, 1344), 8, ((448, 448), (2, 4), (630, 322))),
    ((1344, 1344), 9, ((448, 448), (3, 3), (448, 448))),
    ((1000, 700), 1, ((532, 378), None, None)),
    ((1000, 700), 2, ((532, 378), (2, 1), (378, 532))),
    ((1000, 700), 3, ((532, 378), (2, 1), (378, 532))),
    ((1000, 700), 4, ((532, 378), (2, 2), (532, 378))),
    ((1000, 700), 5, ((532, 378), (2, 2), (532, 378))),
    ((1000, 700), 6, ((532, 378), (2, 2), (532, 378))),
    ((1000, 700), 7, ((532, 378), (2, 2), (532, 378))),
    ((1000, 700), 8, ((532, 378), (2, 2), (532, 378))),
    ((1000, 700), 9, ((532, 378), (2, 2), (532, 378))),
]

# sha256 (first 16 hex digits) of `tobytes()` of the official source image and of each cell, row by
# row, for the example images (official slice_image, Pillow 12.3; Pillow 10.1..12.3 agree).
OFFICIAL_PIXELS = {
    "bar_chart.jpg": ("ef3cc6b4d54634fd", ["7ca029c99a558ef6", "0a4bab1ff3024870", "7483a0add76550fa", "09a6d7f0d56a9874"]),
    "bookshelf.jpg": (
        "c857e4e7a117f8b1",
        [
            "6d921ed427f0f4c0",
            "b45906f34c43077b",
            "f1114d4ad01718d6",
            "f438b6e9f459ab30",
            "3b9fd6b030a22161",
            "1bbb8e1c0339d731",
            "8adc5f22a6f5931a",
            "3b3cb637f6a8f8f4",
            "26914c20d3053bed",
        ],
    ),
    "clock.jpg": ("012b4a7431675616", []),
    "document.jpg": (
        "f349f7c4f47f75f1",
        ["cbb15ddc8037b9f0", "059be34d06172ec8", "ad96828b271034a7", "51c0a6933660a3d6", "3a932e93245b159e", "7a83afe034f72d63"],
    ),
    "fruit_bowl.jpg": ("bd56ecf8a84225b2", ["ddd416586ec46621", "24afd03c2493d92b"]),
    "handwritten_note.jpg": ("ffd9b08c381de612", ["718e278aec827e8d", "4b7c10379afdc1c6", "a5fb863358357302"]),
    "landscape.jpg": (
        "742c3865172f1fe0",
        ["304eccacefa532a4", "bf89abc52caf97c2", "52a82847fc59b47b", "d07d18850ba98068", "3c19d6ca8c6630ef", "6f9e6b02ab6ea46b"],
    ),
    "receipt.jpg": ("2d998606d10eb764", ["483848a63a55fd28", "9cce0150546688bb", "82caf09fc09c9996"]),
    "stop_sign.jpg": ("e9f4195ed6b7415d", []),
    "street.jpg": ("c0d3c26ecdd91a86", ["3cedafb244429e09", "70d8d4c960dcd189", "5ec451b273fbeb6d", "a5fb126172b98c89"]),
}

ALL_SIZES = OFFICIAL_FIXED + OFFICIAL_RANDOM


def _blank(size) -> Image.Image:
    return Image.new("RGB", size, (120, 60, 30))


def _textured(size, seed: int = 0) -> Image.Image:
    """An image whose every region differs, so cells cut from the wrong place are caught."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, size=(height, width), dtype=np.int64)
    array = np.stack([(xs * 7 + noise) % 256, (ys * 5 + noise) % 256, (xs * ys + noise) % 256], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def _size_id(case) -> str:
    (width, height), *_ = case
    return f"{width}x{height}"


def _check_against_official(size, max_slice_nums, expected) -> None:
    want_source, want_grid, want_cell = expected
    source, patches, grid = slice_image(_blank(size), max_slice_nums=max_slice_nums)
    assert source.size == want_source
    # the header-only route (used for dataset preparation) gives the same sizes as the pixel route
    got_source, got_cell, got_grid = slice_sizes(size, max_slice_nums=max_slice_nums)
    assert tuple(got_source) == want_source
    assert (None if got_grid is None else tuple(got_grid)) == want_grid
    assert (None if got_cell is None else tuple(got_cell)) == want_cell
    got_best = best_grid_for(size, max_slice_nums=max_slice_nums)
    assert (None if got_best is None else tuple(got_best)) == want_grid
    if want_grid is None:
        assert grid is None
        assert patches == []
        return
    assert grid is not None and tuple(grid) == want_grid
    cols, rows = want_grid
    assert len(patches) == rows, "patches are a list of rows"
    assert all(len(row) == cols for row in patches), "each row holds `cols` cells"
    assert {cell.size for row in patches for cell in row} == {want_cell}


@pytest.mark.parametrize("case", ALL_SIZES, ids=_size_id)
def test_slice_image_and_slice_sizes_match_official(case):
    size, expected = case
    _check_against_official(size, 9, expected)


@pytest.mark.parametrize("case", OFFICIAL_MAX_SLICE, ids=lambda c: f"{c[0][0]}x{c[0][1]}-max{c[1]}")
def test_max_slice_nums_1_to_9_match_official(case):
    size, max_slice_nums, expected = case
    _check_against_official(size, max_slice_nums, expected)


@pytest.mark.parametrize("case", ALL_SIZES, ids=_size_id)
def test_invariants_for_every_max_slice_nums(case):
    """Sides on the 14-pixel patch grid, cell count = cols*rows <= max_slice_nums (rules, not literals)."""
    size, _ = case
    for max_slice_nums in range(1, 10):
        source, cell, grid = slice_sizes(size, max_slice_nums=max_slice_nums)
        assert source[0] % 14 == 0 and source[1] % 14 == 0 and min(source) >= 14
        multiple = min(math.ceil(size[0] * size[1] / 448**2), max_slice_nums)
        if multiple <= 1:
            assert grid is None and cell is None
            continue
        cols, rows = grid
        assert 2 <= cols * rows <= max_slice_nums
        assert cols * rows in (multiple - 1, multiple, multiple + 1)
        assert cell[0] % 14 == 0 and cell[1] % 14 == 0 and min(cell) >= 14


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (14, 14), (200, 150), (300, 400), (447, 447)])
def test_source_is_upscaled_when_not_sliced(size):
    image = _textured(size)
    source, patches, grid = slice_image(image)
    assert grid is None and patches == []
    width, height = source.size
    assert width > size[0] and height > size[1], "small images are upscaled, not kept"
    # about 448^2 pixels, keeping the aspect ratio within the 14-pixel rounding
    assert abs(width * height - 448**2) / 448**2 < 0.1
    assert abs(math.log(width / height) - math.log(size[0] / size[1])) < 0.1
    assert np.array_equal(np.asarray(source), np.asarray(image.resize(source.size, Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("size", [(896, 448), (1344, 896), (1920, 1080), (640, 480), (283, 2283)])
def test_cells_are_cut_row_major_from_the_refined_image(size):
    image = _textured(size, seed=size[0])
    source, patches, grid = slice_image(image)
    cols, rows = grid
    cell_w, cell_h = patches[0][0].size
    refined = np.asarray(image.resize((cell_w * cols, cell_h * rows), Image.Resampling.BICUBIC))
    for r in range(rows):
        for c in range(cols):
            want = refined[r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w]
            assert np.array_equal(np.asarray(patches[r][c]), want), f"cell row {r} col {c}"
    # the source is the whole image downscaled, not a cell
    assert np.array_equal(np.asarray(source), np.asarray(image.resize(source.size, Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("name", sorted(OFFICIAL_PIXELS))
def test_pixels_equal_official_on_example_images(name):
    image = Image.open(EXAMPLES / "images" / name).convert("RGB")
    source, patches, _ = slice_image(image)
    digest = lambda im: hashlib.sha256(im.tobytes()).hexdigest()[:16]  # noqa: E731
    want_source, want_cells = OFFICIAL_PIXELS[name]
    assert digest(source) == want_source
    assert [digest(cell) for row in patches for cell in row] == want_cells
