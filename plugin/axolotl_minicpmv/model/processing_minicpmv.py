"""`MiniCPMVProcessor`: conversations and their pictures -> the ids, labels, pixels and image bounds the model takes.

The one place that builds prompts and image placeholders: the prompt strategy, the collator, `chat`,
prediction and serving all go through it. Placeholder text, the prompt layout and the training ids and
labels must equal the official release's; tests/test_processing.py and tests/test_prompt_strategy.py pin them.

Pictures are marked in user turns by `<image>` tags, in order; a single picture without a tag goes in
front of the first user turn, followed by a newline (the official rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .conversation import IMAGE_TAG, InvalidInputError, validate_conversation
from .image_processing_minicpmv import ImageLayout, MiniCPMVImageProcessor, group_by_size, load_image
from .transfer import to_device

USER_MARKER = "<用户>"
ASSISTANT_MARKER = "<AI>"
ROLE_MARKERS = {"user": USER_MARKER, "assistant": ASSISTANT_MARKER}
IGNORE_INDEX = -100
PAD_TOKEN_ID = 0  # <unk>, as the official trainer pads

__all__ = [
    "ASSISTANT_MARKER",
    "IGNORE_INDEX",
    "ROLE_MARKERS",
    "USER_MARKER",
    "InvalidInputError",
    "MiniCPMVProcessor",
    "group_by_size",
    "image_bounds",
    "load_image",
    "tag_images",
]


class MiniCPMVProcessor(ProcessorMixin):
    """Image processor + tokenizer. `processor(conversations, images)` -> a `BatchFeature` with `input_ids`,
    `attention_mask`, `pixel_values` (one stack per image size), `vision_order`, `image_bound`, and `labels`
    with `return_labels=True` (training rows, the official recipe's tokenization)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        for attr in ("im_start", "im_end", "slice_start", "slice_end", "im_start_id", "im_end_id"):
            if not hasattr(tokenizer, attr):
                raise TypeError(
                    f"MiniCPMVProcessor needs the MiniCPM-V tokenizer (it has no `{attr}`); load it with "
                    "axolotl_minicpmv.load_tokenizer(model_dir) or AutoTokenizer after importing axolotl_minicpmv"
                )

    @classmethod
    def from_config(cls, tokenizer, config, max_slice_nums: int | None = None) -> MiniCPMVProcessor:
        """The processor of a model (its config's slicing keys), optionally with another slice budget."""
        return cls(MiniCPMVImageProcessor.from_model_config(config, max_slice_nums=max_slice_nums), tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> MiniCPMVProcessor:
        """From a checkpoint: `preprocessor_config.json` under `config.json`'s slicing keys, and the tokenizer."""
        from .tokenization import load_tokenizer

        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("max_slice_nums", "slice_mode")}
        image_processor = MiniCPMVImageProcessor.from_pretrained(pretrained_model_name_or_path, **image_kwargs)
        return cls(image_processor, load_tokenizer(pretrained_model_name_or_path, **kwargs))

    def save_pretrained(self, save_directory, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        return super().save_pretrained(save_directory, **kwargs)

    @property
    def query_num(self) -> int:
        return self.image_processor.image_feature_size

    # one picture -----------------------------------------------------------

    def layout(self, image_or_size) -> ImageLayout:
        size = image_or_size.size if isinstance(image_or_size, Image.Image) else tuple(image_or_size)
        return self.image_processor.layout(size)

    def image_placeholder(self, layout_or_size) -> str:
        """Placeholder text of a picture: the source's slots, then `<slice>` + the grid's rows + `</slice>`."""
        layout = layout_or_size if isinstance(layout_or_size, ImageLayout) else self.layout(layout_or_size)
        tok = self.tokenizer
        one = tok.im_start + tok.unk_token * self.query_num + tok.im_end
        if layout.grid is None:
            return one
        cols, rows = layout.grid
        return one + tok.slice_start + "\n".join([one * cols] * rows) + tok.slice_end

    def source_image(self, image: Image.Image, layout: ImageLayout | None = None) -> Image.Image:
        return self.image_processor.source_image(image, layout)

    def cell_images(self, image: Image.Image, layout: ImageLayout | None = None) -> list[Image.Image]:
        return self.image_processor.cell_images(image, layout)

    def vision_images(self, image: Image.Image, layout: ImageLayout | None = None) -> list[Image.Image]:
        return self.image_processor.vision_images(image, layout)

    def pixel_values(self, image: Image.Image, device=None, layout: ImageLayout | None = None) -> list[torch.Tensor]:
        return self.image_processor.pixel_values(image, layout, device)

    # conversations -> ids --------------------------------------------------

    def expand_image_tags(self, conversation: list[dict], layouts: Sequence[ImageLayout]) -> list[dict]:
        """Replace the `<image>` tags of the user turns, in order, by the pictures' placeholder texts."""
        remaining = iter([self.image_placeholder(layout) for layout in layouts])
        out = []
        for msg in conversation:
            content = msg["content"]
            if msg["role"] == "user" and IMAGE_TAG in content:
                first, *rest = content.split(IMAGE_TAG)
                try:
                    content = first + "".join(next(remaining) + part for part in rest)
                except StopIteration:
                    raise InvalidInputError(f"more {IMAGE_TAG!r} tags than images ({len(layouts)})") from None
            out.append({"role": msg["role"], "content": content})
        if next(remaining, None) is not None:
            raise InvalidInputError(f"fewer {IMAGE_TAG!r} tags than images ({len(layouts)})")
        return out

    def prompt_text(self, conversation: list[dict], layouts: Sequence[ImageLayout] = ()) -> str:
        """Inference prompt: turns rendered `<用户>`/`<AI>` + content, ending with `<AI>` (tags already placed)."""
        turns = self.expand_image_tags(conversation, layouts) if layouts else conversation
        return "".join(ROLE_MARKERS[msg["role"]] + msg["content"] for msg in turns) + ASSISTANT_MARKER

    def encode_prompt(self, prompt: str, max_inp_length: int | None = None) -> torch.Tensor:
        """Token ids (with bos) of an inference prompt; refuses to cut a prompt that is too long."""
        ids = self.tokenizer.encode(prompt)
        if max_inp_length is not None and len(ids) > max_inp_length:
            raise InvalidInputError(
                f"prompt is {len(ids)} tokens, longer than max_inp_length={max_inp_length} "
                "(image placeholders included); shorten the conversation, lower max_slice_nums, or raise max_inp_length"
            )
        return torch.tensor(ids, dtype=torch.long)

    def prompt_ids(self, conversation: list[dict], image_sizes: Sequence[tuple[int, int]], max_length: int | None = None) -> list[int]:
        """The token ids of `inference_inputs`' prompt for pictures of these (width, height) sizes, without decoding
        them; over `max_length` tokens, InvalidInputError as `inference_inputs` raises it."""
        layouts = [self.layout(size) for size in image_sizes]
        return self.encode_prompt(self._inference_prompt(conversation, layouts), max_length).tolist()

    def inference_pixels(self, images: Sequence[Image.Image], device=None) -> list[torch.Tensor]:
        """The pixels of `inference_inputs` for these pictures: each picture's source, then its cells. Raises what PIL
        and torch raise on a picture that cannot be decoded (OSError, ValueError, RuntimeError)."""
        return self._pixels(images, [self.layout(image) for image in images], device)

    def inference_inputs(
        self, conversation: list[dict], images: Sequence[Image.Image], max_length: int | None = None, device=None
    ) -> tuple[list[int], list[torch.Tensor]]:
        """`(ids, pixels)` of an inference prompt: the prompt's token ids (with bos, ending with `<AI>`) and the
        pixels of its pictures' vision images (each picture's source, then its cells), in placeholder order.

        `conversation` holds checked `{role, content}` turns; `images` its opened pictures, placed where the user
        turns' `<image>` tags are (a single untagged one in front of the first user turn). The prompt comes
        first: a conversation that does not fit its pictures' tags, or a prompt over `max_length` tokens, raises
        InvalidInputError before any pixels are made (`prompt_ids`), then `inference_pixels`.
        """
        return self.prompt_ids(conversation, [image.size for image in images], max_length), self.inference_pixels(images, device)

    def _inference_prompt(self, conversation: list[dict], layouts: Sequence[ImageLayout]) -> str:
        # the pictures' tags placed (a single untagged one in front), then expanded to their placeholders
        return self.prompt_text(tag_images(conversation, len(layouts)), layouts)

    def _pixels(self, images: Sequence[Image.Image], layouts: Sequence[ImageLayout], device=None) -> list[torch.Tensor]:
        return [p for image, layout in zip(images, layouts) for p in self.pixel_values(image, device, layout)]

    def chat_prompt(self, msgs, image: Image.Image | None) -> str:
        """The prompt `chat` builds for `msgs` about `image` (the image in front of the first user turn)."""
        images = [] if image is None else [image]
        conversation = tag_images(validate_conversation(msgs), len(images))
        return self.prompt_text(conversation, [self.layout(im) for im in images])

    def encode_training_conversation(self, conversation: list[dict], layouts: Sequence[ImageLayout] = ()) -> dict[str, list[int]]:
        """Ids, unshifted labels (`labels[i]` is what position i-1 predicts) and attention mask of a training row.

        As the official fine-tuning code: each role marker and each message encoded on its own with
        `tokenizer.encode(x)[1:]` (no bos in front), `</s>` appended to the last message. Supervised: every
        assistant content token, and an eos predicted by the last token of each assistant turn that a user
        turn follows. Never supervised: role markers, user text and image slots.
        """
        tok = self.tokenizer
        turns = self.expand_image_tags(conversation, layouts)
        ids: list[int] = []
        trained: list[bool] = []  # the official `context == 0`
        for index, msg in enumerate(turns):
            text = msg["content"] + (tok.eos_token if index == len(turns) - 1 else "")
            marker_ids = self._encode_without_bos(ROLE_MARKERS[msg["role"]])
            text_ids = self._encode_without_bos(text)
            ids += marker_ids + text_ids
            trained += [False] * len(marker_ids) + [msg["role"] == "assistant"] * len(text_ids)
        labels = [IGNORE_INDEX] * len(ids)
        for i in range(1, len(ids)):
            if trained[i]:
                labels[i] = ids[i]
            elif trained[i - 1]:  # an assistant turn just ended: its last token predicts eos
                labels[i] = tok.eos_token_id
        found = sum(1 for token in ids if token == tok.im_start_id)
        expected = sum(layout.num_images for layout in layouts)
        if found != expected:
            raise InvalidInputError(f"{found} {IMAGE_TAG!r} tokens in the ids but {expected} image placeholders were placed")
        return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}

    def _encode_without_bos(self, text: str) -> list[int]:
        # the official `tokenizer.encode(x)[1:]`, made loud if a tokenizer ever stops adding bos
        ids = self.tokenizer.encode(text)
        if not ids or ids[0] != self.tokenizer.bos_token_id:
            raise ValueError(f"tokenizer.encode() must start with bos ({self.tokenizer.bos_token_id}); got {ids[:3]}")
        return ids[1:]

    # batches ----------------------------------------------------------------

    def __call__(
        self,
        conversations: Sequence,
        images: Sequence[Sequence] | None = None,
        *,
        return_labels: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        device=None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """A batch of conversations (each a list of {role, content}, or one conversation) and, per conversation,
        its pictures (PIL images, paths, bytes or base64; `<image>` tags mark where they go).

        `return_labels=True`: training rows (the official training tokenization, labels); otherwise inference
        prompts ending with `<AI>` (the chat tokenization; `max_length` refuses longer prompts). Generation
        batches take `padding_side="left"`.
        """
        if return_tensors != "pt":
            raise ValueError(f"MiniCPMVProcessor returns PyTorch tensors; return_tensors={return_tensors!r}")
        if conversations and isinstance(conversations[0], dict):
            conversations, images = [conversations], None if images is None else [images]
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} image lists for {len(conversations)} conversations")
        rows, pixels = [], []
        for index, (msgs, row_images) in enumerate(zip(conversations, images)):
            where = f"conversations[{index}]"
            row_images = [row_images] if isinstance(row_images, (Image.Image, str, bytes, Path)) else list(row_images or [])
            loaded = [load_image(im, what=f"{where}: image {k}") for k, im in enumerate(row_images)]
            try:
                turns = validate_conversation(msgs, field=where, for_training=return_labels)
                if return_labels:
                    layouts = [self.layout(im) for im in loaded]
                    row = self.encode_training_conversation(tag_images(turns, len(loaded)), layouts)
                    row_pixels = self._pixels(loaded, layouts, device)
                else:
                    ids, row_pixels = self.inference_inputs(turns, loaded, max_length, device)
                    row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
            except InvalidInputError as err:  # the prompt's (the pixels raise no InvalidInputError)
                raise InvalidInputError(err.args[0] if err.args[0].startswith(where) else f"{where}: {err}") from None
            rows.append(row)
            pixels.append(row_pixels)
        return self.batch(rows, pixels, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of, device=device)

    def batch(
        self,
        rows: Sequence[dict],
        pixel_values: Sequence[Sequence[torch.Tensor]],
        *,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        names: Sequence[str] | None = None,
        device=None,
    ) -> BatchFeature:
        """Pad tokenized rows (`input_ids`, optional `labels` / `attention_mask`) into tensors and add their vision
        inputs: `pixel_values[i]` holds row i's images (sources and cells) in placeholder order. Every row's
        placeholders are checked against its images (`names[i]` names the row in errors)."""
        if not rows:
            raise ValueError("MiniCPMVProcessor.batch got no rows")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        names = names or [f"batch row {i}" for i in range(len(rows))]
        length = max(len(row["input_ids"]) for row in rows)
        if pad_to_multiple_of:
            length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
        with_labels = "labels" in rows[0]
        input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            ids = row["input_ids"]
            n = len(ids)
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[index, span] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[index, span] = torch.as_tensor(row.get("attention_mask") or [1] * n, dtype=torch.long)
            if with_labels:
                if len(row["labels"]) != n:
                    raise InvalidInputError(f"{names[index]}: {len(row['labels'])} labels for {n} input_ids")
                labels[index, span] = torch.as_tensor(row["labels"], dtype=torch.long)
                # Training text cannot hold placeholder tokens of its own (the data checks refuse them), so every
                # `<image>` token opens a placeholder; an inference prompt's earlier answers may hold such tokens.
                placeholders = sum(1 for token in ids if token == self.tokenizer.im_start_id)
                if len(pixel_values[index]) != placeholders:
                    raise InvalidInputError(
                        f"{names[index]}: {len(pixel_values[index])} vision images (sources + slices) but {placeholders} "
                        f"image placeholders in input_ids; the max_slice_nums ({self.image_processor.max_slice_nums}) "
                        "must be the one the dataset was tokenized with"
                    )
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            out["labels"] = labels
        flat = [p for row_pixels in pixel_values for p in row_pixels]
        if flat:
            bounds = torch.cat([self._row_bounds(input_ids[i], i, len(p)) for i, p in enumerate(pixel_values) if p])
            check_image_slots(bounds, self.query_num)
            groups, order = group_by_size(flat)
            out.update(pixel_values=groups, vision_order=order, image_bound=bounds)
        return move_inputs(out, device) if device is not None else BatchFeature(out)

    def _row_bounds(self, ids: torch.Tensor, row: int, count: int) -> torch.Tensor:
        bounds = image_bounds(ids, self.tokenizer.im_start_id, self.tokenizer.im_end_id, count=count)
        bounds[:, 0] = row
        return bounds


def tag_images(conversation: list[dict], num_images: int) -> list[dict]:
    """Put a single untagged picture in front of the first user turn, followed by a newline (the official rule).

    Conversations that tag their pictures, or have none, come back unchanged.
    """
    tags = sum(msg["content"].count(IMAGE_TAG) for msg in conversation if msg["role"] == "user")
    if num_images != 1 or tags:
        return conversation
    first = conversation[0]
    return [{"role": first["role"], "content": IMAGE_TAG + "\n" + first["content"]}] + list(conversation[1:])


def check_image_slots(image_bound: torch.Tensor, query_num: int) -> None:
    """Every placeholder between `<image>` and `</image>` must hold exactly `query_num` slots (host bounds)."""
    lengths = image_bound[:, 2] - image_bound[:, 1]
    if bool((lengths != query_num).any()):
        raise InvalidInputError(f"every image placeholder must hold {query_num} slots, found {sorted(set(lengths.tolist()))}")


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


def move_inputs(inputs, device) -> BatchFeature:
    """A processor output (its tensors, and the stacks of `pixel_values`) on `device`, without blocking the host."""
    return BatchFeature(
        {k: ([to_device(g, device) for g in v] if k == "pixel_values" else to_device(v, device)) for k, v in inputs.items()}
    )
