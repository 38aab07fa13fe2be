"""Batches of tokenized MiniCPM-V rows: padded ids/labels plus sliced pixels and image bounds.

The pixels must line up with the placeholders the prompt strategy placed (source image, then the
slices row by row, image after image); the collator checks the counts and every slot length, so a
layout mismatch fails here with the sample id rather than inside the model. Output keys are exactly
what `MiniCPMV.forward` takes. Tests: tests/test_collator.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import DEFAULT_MAX_SLICE_NUMS, max_slice_nums_from_cfg, row_images
from ..model.processing_minicpmv import InvalidInputError, MiniCPMVProcessor, group_by_size, image_bounds, load_image

IGNORE_INDEX = -100


@dataclass
class MiniCPMVDataCollator:
    """Built by Axolotl as `cls(tokenizer, padding=True, pad_to_multiple_of=64, return_tensors="pt", **kwargs)`.

    Rows: `input_ids`, `labels`, `attention_mask` (lists of ints) and, when the sample has images,
    `image` (absolute paths) and `image_sizes` (the [w, h] the placeholders were laid out for).
    Returns input_ids, attention_mask, labels and, if the batch has any image, pixel_values (one
    (n, 3, H, W) tensor per distinct size), vision_order and image_bound (rows (batch_row, start, end)).
    """

    tokenizer: Any
    padding: bool | str = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    max_slice_nums: int = DEFAULT_MAX_SLICE_NUMS
    query_num: int = 64
    scale_resolution: int = 448
    patch_size: int = 14
    pad_token_id: int = 0  # <unk>, as the official trainer pads
    label_pad_token_id: int = IGNORE_INDEX
    _processor: MiniCPMVProcessor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.padding not in (True, "longest"):
            raise ValueError(f"MiniCPMVDataCollator pads to the longest row; padding={self.padding!r} is not supported")
        if self.return_tensors != "pt":
            raise ValueError(f"MiniCPMVDataCollator returns PyTorch tensors; return_tensors={self.return_tensors!r}")

    @property
    def processor(self) -> MiniCPMVProcessor:
        if self._processor is None:
            self._processor = MiniCPMVProcessor(
                self.tokenizer,
                query_num=self.query_num,
                max_slice_nums=self.max_slice_nums,
                scale_resolution=self.scale_resolution,
                patch_size=self.patch_size,
            )
        return self._processor

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        if not features:
            raise ValueError("MiniCPMVDataCollator got an empty batch")
        length = max(len(row["input_ids"]) for row in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), self.label_pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        pixel_values: list[torch.Tensor] = []
        for row_index, row in enumerate(features):
            ids = row["input_ids"]
            n = len(ids)
            if len(row["labels"]) != n:
                raise InvalidInputError(f"{_which(row, row_index)}: {len(row['labels'])} labels for {n} input_ids")
            input_ids[row_index, :n] = torch.as_tensor(ids, dtype=torch.long)
            labels[row_index, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            attention_mask[row_index, :n] = torch.as_tensor(row.get("attention_mask") or [1] * n, dtype=torch.long)
            pixel_values += self._row_pixels(row, row_index, input_ids[row_index, :n])

        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if not pixel_values:
            return batch
        bounds = image_bounds(input_ids, self.tokenizer.im_start_id, self.tokenizer.im_end_id)
        slots = bounds[:, 2] - bounds[:, 1]
        if bool((slots != self.query_num).any()):
            raise InvalidInputError(f"every image placeholder must hold {self.query_num} slots, found {sorted(set(slots.tolist()))}")
        groups, order = group_by_size(pixel_values)
        batch.update(pixel_values=groups, vision_order=order, image_bound=bounds)
        return batch

    def _row_pixels(self, row: dict, row_index: int, ids: torch.Tensor) -> list[torch.Tensor]:
        """Vision inputs of one row (each image: source, then cells), checked against its placeholders."""
        placeholders = int((ids == self.tokenizer.im_start_id).sum())
        paths = row_images(row) if "image" in row else None  # paths or embedded bytes
        if paths is None and placeholders:
            raise InvalidInputError(
                f"{_which(row, row_index)}: the ids hold {placeholders} image placeholders but the row has no "
                "`image` column (set `remove_unused_columns: false` so the Trainer keeps it)"
            )
        sizes = row.get("image_sizes") or [None] * len(paths or [])
        pixels: list[torch.Tensor] = []
        for k, (path, size) in enumerate(zip(paths or [], sizes)):
            name = path if isinstance(path, str) else f"#{k} (embedded)"
            image = load_image(path, what=f"{_which(row, row_index)}: image {name}")
            if size is not None and tuple(image.size) != tuple(size):
                raise InvalidInputError(
                    f"{_which(row, row_index)}: image {name} is {image.size[0]}x{image.size[1]} but the dataset was "
                    f"prepared for {size[0]}x{size[1]}; the file changed: delete the prepared dataset and run again"
                )
            pixels += self.processor.pixel_values(image)
        if len(pixels) != placeholders:
            raise InvalidInputError(
                f"{_which(row, row_index)}: {len(pixels)} vision images (sources + slices) but {placeholders} image "
                f"placeholders in input_ids; the collator's max_slice_nums ({self.max_slice_nums}) must be the "
                "one the dataset was tokenized with"
            )
        return pixels


def _which(row: dict, row_index: int) -> str:
    return f"sample {row['id']!r}" if row.get("id") is not None else f"batch row {row_index}"


def collator_cls_and_kwargs(cfg) -> tuple[type, dict]:
    """What the plugin's `get_collator_cls_and_kwargs` returns (same for train and eval)."""
    return MiniCPMVDataCollator, {"max_slice_nums": max_slice_nums_from_cfg(cfg)}
