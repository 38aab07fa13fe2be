"""Images and prompts for MiniCPM-V 2.0: pixels, image placeholders, chat prompts, image bounds.

Placeholder text, prompt layout and pixel normalisation must equal the official release's so that
prompt ids and image features are identical; tests/test_processing.py pins them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .conversation import IMAGE_TAG, InvalidInputError, validate_conversation
from .slicing import cell_images, slice_sizes, source_image

USER_MARKER = "<用户>"
ASSISTANT_MARKER = "<AI>"
ROLE_MARKERS = {"user": USER_MARKER, "assistant": ASSISTANT_MARKER}


# ---------------------------------------------------------------- images


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


def _is_file(path) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a long base64 string is no valid path
        return False


def to_pixel_values(image: Image.Image, device: torch.device | str | None = None) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1] (scaled to [0, 1], then mean = std = 0.5).

    With `device`, the bytes are moved first (`to_device`) and scaled there (same float32 operations, same
    values). Bound for a GPU, they are written straight into pinned memory, which `to_device` then uses.
    """
    pixels = np.asarray(image, dtype=np.uint8)
    to_gpu = device is not None and torch.device(device).type == "cuda"
    array = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=to_gpu)
    array.numpy()[...] = pixels
    if device is not None:
        array = to_device(array, device)
    return array.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)`; to a GPU through pinned memory (the tensor's own if it is pinned) without
    blocking, so that the host does not wait for the GPU's queued work (the vision tower, the previous
    training step) before it goes on launching the next kernels."""
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    return pinned.to(device, non_blocking=True)


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


# ---------------------------------------------------------------- prompts


class MiniCPMVProcessor:
    """Turns images and conversations into the prompt text, token ids and pixels the model takes."""

    def __init__(self, tokenizer, query_num: int = 64, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14):
        self.tokenizer = tokenizer
        self.query_num = query_num
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size

    @classmethod
    def from_config(cls, tokenizer, config, max_slice_nums: int | None = None):
        return cls(
            tokenizer,
            query_num=config.query_num,
            max_slice_nums=config.max_slice_nums if max_slice_nums is None else max_slice_nums,
            scale_resolution=config.scale_resolution,
            patch_size=config.patch_size,
        )

    # one image -> placeholder text and vision inputs

    def _one_image_placeholder(self) -> str:
        tok = self.tokenizer
        return tok.im_start + tok.unk_token * self.query_num + tok.im_end

    def image_placeholder(self, size: tuple[int, int]) -> str:
        """Placeholder text for an image of `size` (width, height): source, then the slice grid if any."""
        _, _, grid = slice_sizes(size, self.max_slice_nums, self.scale_resolution, self.patch_size)
        one = self._one_image_placeholder()
        if grid is None:
            return one
        cols, rows = grid
        return one + self.tokenizer.slice_start + "\n".join([one * cols] * rows) + self.tokenizer.slice_end

    def source_image(self, image: Image.Image) -> Image.Image:
        return source_image(image, self.max_slice_nums, self.scale_resolution, self.patch_size)

    def cell_images(self, image: Image.Image) -> list[Image.Image]:
        """The slice grid's cells row by row (empty when the image is not sliced); all of one size."""
        return [cell for row in cell_images(image, self.max_slice_nums, self.scale_resolution, self.patch_size) for cell in row]

    def vision_images(self, image: Image.Image) -> list[Image.Image]:
        """The images the vision tower encodes for one picture: the source, then the cells row by row."""
        return [self.source_image(image)] + self.cell_images(image)

    def pixel_values(self, image: Image.Image, device: torch.device | str | None = None) -> list[torch.Tensor]:
        return [to_pixel_values(im, device) for im in self.vision_images(image)]

    # conversations

    def chat_prompt(self, msgs, image: Image.Image | None) -> str:
        """Inference prompt: turns rendered `<用户>`/`<AI>` + content, the image before the first user text."""
        msgs = validate_conversation(msgs)
        parts = []
        for index, msg in enumerate(msgs):
            content = msg["content"]
            if index == 0 and image is not None:
                content = self.image_placeholder(image.size) + "\n" + content
            parts.append(ROLE_MARKERS[msg["role"]] + content)
        return "".join(parts) + ASSISTANT_MARKER

    def encode_prompt(self, prompt: str, max_inp_length: int | None = None) -> torch.Tensor:
        """Token ids (with bos) of an inference prompt; refuses to cut a prompt that is too long."""
        ids = self.tokenizer.encode(prompt)
        if max_inp_length is not None and len(ids) > max_inp_length:
            raise InvalidInputError(
                f"prompt is {len(ids)} tokens, longer than max_inp_length={max_inp_length} "
                "(image placeholders included); shorten the conversation, lower max_slice_nums, or raise max_inp_length"
            )
        return torch.tensor(ids, dtype=torch.long)


def image_bounds(input_ids: torch.Tensor, im_start_id: int, im_end_id: int, count: int | None = None) -> torch.Tensor:
    """Rows `(batch_row, start, end)`: the slots between each `<image>` and its `</image>`, in order.

    With `count`, only the first `count` pairs of each row are images (a chat prompt places its image
    first); later `<image>`/`</image>` tokens, e.g. from an earlier answer, stay ordinary tokens.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    rows = []
    for row, seq in enumerate(ids):
        starts = torch.nonzero(seq == im_start_id).flatten() + 1
        ends = torch.nonzero(seq == im_end_id).flatten()
        if count is not None:
            starts, ends = starts[:count], ends[:count]
        if len(starts) != len(ends) or bool((ends < starts).any()) or (count is not None and len(starts) < count):
            raise InvalidInputError(
                f"row {row}: {len(starts)} <image> and {len(ends)} </image> tokens do not pair up "
                "(was the prompt cut inside an image placeholder?)"
            )
        rows.extend((row, int(s), int(e)) for s, e in zip(starts, ends))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
