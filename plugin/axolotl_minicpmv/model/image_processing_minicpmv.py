"""`MiniCPMVImageProcessor`: pictures -> the source image and slice cells -> normalised pixel values.

Slicing and pixels must equal the official release's (tests/test_slicing.py, tests/test_processing.py).
Settings are the official `preprocessor_config.json` keys, with the slicing keys of the checkpoint's `config.json`
taking precedence (the official code slices by them). An `ImageLayout` holds one picture's slice geometry, computed
once and used for its prompt placeholder and its pixels alike.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .conversation import InvalidInputError
from .slicing import cut_cells, resize_source, slice_sizes
from .transfer import to_device

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# config.json key -> image processor attribute (a key the config leaves out keeps __init__'s official default)
MODEL_CONFIG_SLICING_KEYS = {
    "max_slice_nums": "max_slice_nums",
    "scale_resolution": "scale_resolution",
    "patch_size": "patch_size",
    "query_num": "image_feature_size",
    "slice_mode": "slice_mode",
}


@dataclass(frozen=True)
class ImageLayout:
    """Where one picture goes: its size, the source image's size and, when sliced, the cells' size and grid."""

    size: tuple[int, int]  # the picture's (width, height)
    source: tuple[int, int]  # (width, height) of the source image the tower sees first
    cell: tuple[int, int] | None = None  # (width, height) of each slice
    grid: tuple[int, int] | None = None  # (cols, rows)

    @property
    def num_images(self) -> int:
        """Images the vision tower encodes for this picture: the source, then the cells."""
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)


class MiniCPMVImageProcessor(BaseImageProcessor):
    """Slicing, source image and cells, pixel values, and grouping of equal-sized images for the tower."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        image_feature_size: int = 64,
        norm_mean: Sequence[float] = (0.5, 0.5, 0.5),
        norm_std: Sequence[float] = (0.5, 0.5, 0.5),
        slice_mode: bool = True,
        **kwargs,
    ):
        # Other official keys (im_start, unk, ...) are kept as attributes, so a saved file keeps them.
        kwargs.pop("auto_map", None)  # the official file names remote code, which is never run
        super().__init__(**kwargs)
        if isinstance(max_slice_nums, bool) or not isinstance(max_slice_nums, int) or max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be a positive integer, got {max_slice_nums!r}")
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.norm_mean = list(norm_mean)
        self.norm_std = list(norm_std)
        self.slice_mode = slice_mode

    @classmethod
    def from_model_config(cls, config, **overrides) -> MiniCPMVImageProcessor:
        """The settings of a model config (`MiniCPMVConfig` or the `config.json` dict)."""
        get = config.get if isinstance(config, dict) else lambda key, default: getattr(config, key, default)
        settings = {ours: value for theirs, ours in MODEL_CONFIG_SLICING_KEYS.items() if (value := get(theirs, None)) is not None}
        return cls(**{**settings, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A folder's `preprocessor_config.json`, with the slicing keys its `config.json` sets taking precedence (the
        official 2.0 code slices by config.json, and so do `chat` and `predict` here; its preprocessor file has no
        `slice_mode`), and `kwargs` over both."""
        from transformers.utils import cached_file

        kwargs = {key: value for key, value in kwargs.items() if value is not None}  # None: not chosen by the caller
        config = {}
        config_file = cached_file(
            pretrained_model_name_or_path,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if config_file is not None:  # a folder, or a hub id's cached file
            config = json.loads(Path(config_file).read_text(encoding="utf-8"))
            if not (Path(config_file).parent / PREPROCESSOR_CONFIG).is_file() and Path(pretrained_model_name_or_path).is_dir():
                return cls.from_model_config(config, **kwargs)
        image_processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for theirs, ours in MODEL_CONFIG_SLICING_KEYS.items():
            if theirs in config and ours not in kwargs:
                setattr(image_processor, ours, config[theirs])
        return image_processor

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_processor_class", None)
        out.pop("_normalisation_by_device", None)
        return out

    # geometry -------------------------------------------------------------

    def layout(self, size: tuple[int, int]) -> ImageLayout:
        """Slice geometry of a picture of `size` (width, height): from its header alone, no pixels needed."""
        return _layout(tuple(size), self.slice_mode, self.max_slice_nums, self.scale_resolution, self.patch_size)

    # pixels ---------------------------------------------------------------

    def source_image(self, image: Image.Image, layout: ImageLayout | None = None) -> Image.Image:
        layout = layout or self.layout(image.size)
        return resize_source(image, layout.source) if self.slice_mode else image

    def cell_images(self, image: Image.Image, layout: ImageLayout | None = None) -> list[Image.Image]:
        """The grid's cells row by row (empty when the picture is not sliced); all of one size."""
        layout = layout or self.layout(image.size)
        return [cell for row in cut_cells(image, layout.cell, layout.grid) for cell in row]

    def vision_images(self, image: Image.Image, layout: ImageLayout | None = None) -> list[Image.Image]:
        """The images the vision tower encodes for one picture: the source, then the cells row by row."""
        layout = layout or self.layout(image.size)
        return [self.source_image(image, layout)] + self.cell_images(image, layout)

    def to_pixel_values(self, image: Image.Image, device: torch.device | str | None = None) -> torch.Tensor:
        """RGB image -> float tensor (3, H, W): scaled to [0, 1], then (x - norm_mean) / norm_std.

        With `device`, the bytes are moved first (`to_device`) and scaled there (same float32 operations, same
        values). Bound for a GPU, they are written straight into pinned memory, which `to_device` then uses.
        """
        pixels = np.asarray(image, dtype=np.uint8)
        to_gpu = device is not None and torch.device(device).type == "cuda"
        array = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=to_gpu)
        array.numpy()[...] = pixels
        if device is not None:
            array = to_device(array, device)
        mean, std = self._normalisation(array.device)
        # The official operations in their order, in place on one contiguous (3, H, W) tensor: a third faster on
        # a CPU than a new tensor per operation, and the stacks of equal sizes are then plain copies.
        return array.permute(2, 0, 1).contiguous().float().div_(255).sub_(mean).div_(std)

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (3, 1, 1) float32 tensors on `device`, made once per device: building them from Python
        lists on a GPU for every image would make the host wait for the GPU's queued work each time."""
        cache = self.__dict__.setdefault("_normalisation_by_device", {})
        key = (tuple(self.norm_mean), tuple(self.norm_std), str(device))
        if key not in cache:
            host = torch.tensor([self.norm_mean, self.norm_std], dtype=torch.float32)[:, :, None, None]
            cache[key] = tuple(to_device(host, device).unbind(0))
        return cache[key]

    def pixel_values(self, image: Image.Image, layout: ImageLayout | None = None, device=None) -> list[torch.Tensor]:
        """Pixels of every image the tower encodes for one picture (source, then cells)."""
        return [self.to_pixel_values(im, device) for im in self.vision_images(image, layout)]

    def preprocess(self, images, layouts: Sequence[ImageLayout] | None = None, device=None, return_tensors=None, **kwargs) -> BatchFeature:
        """Pictures -> `pixel_values` (per picture, the list of its vision images' (3, H, W) tensors) and
        `image_layouts`. `layouts` may carry geometry already computed (from the images' headers)."""
        if kwargs:
            raise TypeError(f"MiniCPMVImageProcessor.preprocess got unexpected arguments {sorted(kwargs)}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        images = [load_image(im, what=f"images[{i}]") for i, im in enumerate(images)]
        layouts = list(layouts) if layouts is not None else [self.layout(im.size) for im in images]
        if len(layouts) != len(images):
            raise ValueError(f"{len(layouts)} layouts for {len(images)} images")
        for index, (image, layout) in enumerate(zip(images, layouts)):
            if tuple(image.size) != tuple(layout.size):
                raise InvalidInputError(
                    f"images[{index}] is {image.size[0]}x{image.size[1]} but its layout was made for {layout.size[0]}x{layout.size[1]}"
                )
        pixels = [self.pixel_values(im, lay, device) for im, lay in zip(images, layouts)]
        return BatchFeature({"pixel_values": pixels, "image_layouts": layouts})

    @staticmethod
    def group_by_size(pixel_values: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stack equal-sized images so the vision tower sees each size once.

        Returns `(groups, order)`: `groups[k]` is (n_k, 3, H_k, W_k) and `torch.cat` of the per-group
        outputs indexed by `order` gives the images back in their original order.
        """
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, pixels in enumerate(pixel_values):
            by_size.setdefault(tuple(pixels.shape[-2:]), []).append(index)
        groups, flat = [], []
        for indices in by_size.values():
            groups.append(torch.stack([pixel_values[i] for i in indices]))
            flat.extend(indices)
        order = torch.empty(len(flat), dtype=torch.long)
        order[torch.tensor(flat, dtype=torch.long)] = torch.arange(len(flat))
        return groups, order


group_by_size = MiniCPMVImageProcessor.group_by_size


@lru_cache(maxsize=4096)
def _layout(size, slice_mode: bool, max_slice_nums: int, scale_resolution: int, patch_size: int) -> ImageLayout:
    if not slice_mode:  # the official code feeds the picture as it is: one image, no slices
        return ImageLayout(size=size, source=size)
    source, cell, grid = slice_sizes(size, max_slice_nums, scale_resolution, patch_size)
    return ImageLayout(size=size, source=source, cell=cell, grid=grid)


# ---------------------------------------------------------------- reading pictures


def load_image(source, what: str = "image") -> Image.Image:
    """Open a PIL image, a path, raw bytes or a base64 string as RGB, or raise naming `what` and why."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, Path)) and _is_file(source):
            data = Path(source).read_bytes()
        elif isinstance(source, Path):
            raise InvalidInputError(f"{what}: file {str(source)!r} does not exist")
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, str):
            try:
                data = base64.b64decode(source, validate=True)
            except (binascii.Error, ValueError) as err:
                raise InvalidInputError(f"{what}: not an existing file and not valid base64 ({err})") from None
        else:
            raise InvalidInputError(f"{what}: expected a PIL image, a path, bytes or base64, got {type(source).__name__}")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise InvalidInputError(f"{what}: cannot decode image data ({err})") from None
    if image.width < 1 or image.height < 1:
        raise InvalidInputError(f"{what}: empty image of size {image.size}")
    return image.convert("RGB")


def _is_file(path: str | os.PathLike) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a long base64 string is no valid path
        return False
