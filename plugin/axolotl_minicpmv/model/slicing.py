"""High-resolution image slicing of MiniCPM-V 2.0.

Every size, grid choice and rounding step must equal the official release's (int truncation,
Python's banker's `round`, first grid on ties), or the prompt ids and pixels differ;
tests/test_slicing.py pins them on many sizes and aspect ratios.
"""

from __future__ import annotations

import math

from PIL import Image

__all__ = ["slice_image", "source_image", "cell_images", "resize_source", "cut_cells", "best_grid_for", "slice_sizes"]


def _snap(length: float, multiple: int) -> int:
    """Round `length` to the nearest multiple (never below one multiple)."""
    return max(round(length / multiple) * multiple, multiple)


def _resize_to_area(size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool) -> tuple[int, int]:
    """Keep the aspect ratio, bring the area to about scale_resolution**2, snap sides to the patch size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return _snap(width, patch_size), _snap(height, patch_size)


def best_grid_for(size: tuple[int, int], max_slice_nums: int = 9, scale_resolution: int = 448) -> tuple[int, int] | None:
    """The (cols, rows) grid the image is cut into, or None when it is not sliced."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(cols, n // cols) for n in counts for cols in range(1, n + 1) if n % cols == 0]
    log_ratio = math.log(width / height)
    best, best_error = (1, 1), float("inf")
    for cols, rows in candidates:
        error = abs(log_ratio - math.log(cols / rows))
        if error < best_error:  # strict: the first candidate wins ties
            best, best_error = (cols, rows), error
    return best


def _refined_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int) -> tuple[int, int]:
    """Size of the whole image before cutting: each cell about scale_resolution**2, on the patch grid."""
    cols, rows = grid
    cell = (_snap(size[0], cols) / cols, _snap(size[1], rows) / rows)
    cell_w, cell_h = _resize_to_area(cell, scale_resolution, patch_size, allow_upscale=True)
    return cell_w * cols, cell_h * rows


def slice_sizes(size: tuple[int, int], max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14):
    """Pixel sizes (width, height) of the source image and of one cell, plus the grid, without any pixels.

    Used to lay out prompt placeholders from the image header alone (dataset preparation).
    """
    grid = best_grid_for(size, max_slice_nums, scale_resolution)
    source = _resize_to_area(size, scale_resolution, patch_size, allow_upscale=grid is None)
    if grid is None:
        return source, None, None
    refined = _refined_size(size, grid, scale_resolution, patch_size)
    return source, (refined[0] // grid[0], refined[1] // grid[1]), grid


def source_image(image: Image.Image, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14) -> Image.Image:
    """The whole picture, resized to about scale_resolution**2 (the first image the vision tower sees)."""
    source_size, _, _ = slice_sizes(image.size, max_slice_nums, scale_resolution, patch_size)
    return resize_source(image, source_size)


def cell_images(image: Image.Image, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14):
    """The grid's cells as a list of rows of PIL images (empty when the image is not sliced)."""
    _, cell_size, grid = slice_sizes(image.size, max_slice_nums, scale_resolution, patch_size)
    return cut_cells(image, cell_size, grid)


def resize_source(image: Image.Image, source_size: tuple[int, int]) -> Image.Image:
    """The source image at a size `slice_sizes` chose."""
    return image.resize(source_size, Image.Resampling.BICUBIC)


def cut_cells(image: Image.Image, cell_size: tuple[int, int] | None, grid: tuple[int, int] | None):
    """Rows of cells of the sizes `slice_sizes` chose: the picture resized to the whole grid, then cut."""
    if grid is None:
        return []
    cols, rows = grid
    cell_w, cell_h = cell_size
    refined = image.resize((cell_w * cols, cell_h * rows), Image.Resampling.BICUBIC)
    return [[refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)) for c in range(cols)] for r in range(rows)]


def slice_image(image: Image.Image, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14):
    """Return `(source_image, patches, best_grid)` exactly as MiniCPM-V 2.0 does.

    `patches` is a list of rows, each a list of PIL cells (empty when the image is not sliced);
    `best_grid` is `[cols, rows]` or None.
    """
    sizes = (max_slice_nums, scale_resolution, patch_size)
    patches = cell_images(image, *sizes)
    grid = [len(patches[0]), len(patches)] if patches else None
    return source_image(image, *sizes), patches, grid
