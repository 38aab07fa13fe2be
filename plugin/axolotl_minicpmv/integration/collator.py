"""Batches of tokenized MiniCPM-V rows: padded ids/labels plus sliced pixels and image bounds.

Pixels come from the same image processor the prompt strategy laid the placeholders out with (source
image, then the slices row by row, image after image); `MiniCPMVProcessor.batch` pads the rows and
checks every row's placeholders and slot lengths, so a layout mismatch fails here with the sample id
rather than inside the model. Output keys are exactly what `MiniCPMV.forward` takes. Tests:
tests/test_collator.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..model.conversation import InvalidInputError
from ..model.image_processing_minicpmv import MiniCPMVImageProcessor, load_image
from ..model.processing_minicpmv import MiniCPMVProcessor
from .args import image_processor_for
from .data import row_images


@dataclass
class MiniCPMVDataCollator:
    """Built by Axolotl as `cls(tokenizer, padding=True, pad_to_multiple_of=64, return_tensors="pt", **kwargs)`.

    Rows: `input_ids`, `labels`, `attention_mask` (lists of ints) and, when the sample has images,
    `image` (absolute paths or encoded bytes) and `image_sizes` (the [w, h] the placeholders were laid out for).
    Returns input_ids, attention_mask, labels and, if the batch has any image, pixel_values (one
    (n, 3, H, W) tensor per distinct size), vision_order and image_bound (rows (batch_row, start, end)).
    """

    tokenizer: Any
    padding: bool | str = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    image_processor: MiniCPMVImageProcessor | None = None  # the checkpoint's (the plugin passes it); official defaults otherwise
    max_slice_nums: int | None = None  # overrides the image processor's
    _processor: MiniCPMVProcessor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.padding not in (True, "longest"):
            raise ValueError(f"MiniCPMVDataCollator pads to the longest row; padding={self.padding!r} is not supported")
        if self.return_tensors != "pt":
            raise ValueError(f"MiniCPMVDataCollator returns PyTorch tensors; return_tensors={self.return_tensors!r}")

    @property
    def processor(self) -> MiniCPMVProcessor:
        if self._processor is None:
            image_processor = self.image_processor or MiniCPMVImageProcessor()
            if self.max_slice_nums is not None:
                image_processor = MiniCPMVImageProcessor(**{**image_processor.to_dict(), "max_slice_nums": self.max_slice_nums})
            self._processor = MiniCPMVProcessor(image_processor, self.tokenizer)
        return self._processor

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        if not features:
            raise ValueError("MiniCPMVDataCollator got an empty batch")
        names = [_which(row, index) for index, row in enumerate(features)]
        pixels = [self._row_pixels(row, name) for row, name in zip(features, names)]
        return dict(self.processor.batch(features, pixels, pad_to_multiple_of=self.pad_to_multiple_of, names=names))

    def _row_pixels(self, row: dict, name: str) -> list:
        """Vision inputs of one row: each image's source, then its cells."""
        if "image" not in row and any(token == self.tokenizer.im_start_id for token in row["input_ids"]):
            placeholders = sum(1 for token in row["input_ids"] if token == self.tokenizer.im_start_id)
            raise InvalidInputError(
                f"{name}: the ids hold {placeholders} image placeholders but the row has no "
                "`image` column (set `remove_unused_columns: false` so the Trainer keeps it)"
            )
        images = row_images(row)
        sizes = row.get("image_sizes") or [None] * len(images)
        pixels = []
        for entry, size in zip(images, sizes):
            shown = entry if isinstance(entry, str) else "(embedded)"
            image = load_image(entry, what=f"{name}: image {shown}")
            if size is not None and tuple(image.size) != tuple(size):
                raise InvalidInputError(
                    f"{name}: image {shown} is {image.size[0]}x{image.size[1]} but the dataset was "
                    f"prepared for {size[0]}x{size[1]}; the file changed: delete the prepared dataset and run again"
                )
            pixels += self.processor.pixel_values(image, layout=self.processor.layout(image.size))
        return pixels


def _which(row: dict, row_index: int) -> str:
    return f"sample {row['id']!r}" if row.get("id") is not None else f"batch row {row_index}"


def collator_cls_and_kwargs(cfg) -> tuple[type, dict]:
    """What the plugin's `get_collator_cls_and_kwargs` returns (same for train and eval)."""
    return MiniCPMVDataCollator, {"image_processor": image_processor_for(cfg)}
