"""Axolotl prompt strategy `type: axolotl_minicpmv.minicpmv_chat`: MiniCPM-V chat samples -> ids, labels.

Ids and the label rule must equal the official MiniCPM-V fine-tuning code (June 2024): each role
marker and each message encoded on its own with `tokenizer.encode(x)[1:]`, `</s>` appended to the
last message, only assistant tokens plus one eos after every assistant turn supervised, and no
bos in front (the official training ids have none). Labels are emitted unshifted (the model shifts). Reads rows prepared by
`data.py`; tests/test_prompt_strategy.py checks both against an official-style pre-shifted target.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from axolotl.datasets import TokenizedPromptDataset
from axolotl.prompt_tokenizers import IGNORE_INDEX, DatasetWrappingStrategy, PromptTokenizingStrategy
from axolotl.utils.logging import get_logger

from .data import DATASET_TYPE, max_slice_nums_from_cfg
from ..model.processing_minicpmv import IMAGE_TAG, ROLE_MARKERS, InvalidInputError, MiniCPMVProcessor

LOG = get_logger(__name__)

PREPARED_COLUMNS = ("id", "image", "image_sizes", "conversations")


# ---------------------------------------------------------------- ids and labels of one sample


def expand_image_tags(conversations: list[dict], placeholders: list[str]) -> list[dict]:
    """Replace the `<image>` tags of the user turns, in order, by the images' placeholder texts."""
    remaining = iter(placeholders)
    out = []
    for msg in conversations:
        content = msg["content"]
        if msg["role"] == "user" and IMAGE_TAG in content:
            first, *rest = content.split(IMAGE_TAG)
            try:
                content = first + "".join(next(remaining) + part for part in rest)
            except StopIteration:
                raise InvalidInputError(f"more {IMAGE_TAG!r} tags than images ({len(placeholders)})") from None
        out.append({"role": msg["role"], "content": content})
    if next(remaining, None) is not None:
        raise InvalidInputError(f"fewer {IMAGE_TAG!r} tags than images ({len(placeholders)})")
    return out


def _encode_without_bos(tokenizer, text: str) -> list[int]:
    # the official `tokenizer.encode(x)[1:]`, made loud if a tokenizer ever stops adding bos
    ids = tokenizer.encode(text)
    if not ids or ids[0] != tokenizer.bos_token_id:
        raise ValueError(f"tokenizer.encode() must start with bos ({tokenizer.bos_token_id}); got {ids[:3]}")
    return ids[1:]


def build_ids_and_labels(tokenizer, conversations: list[dict]) -> dict[str, list[int]]:
    """Ids, unshifted labels (`labels[i]` is what position i-1 predicts) and attention mask.

    `conversations` already holds the expanded placeholders. Supervised: every assistant content
    token, and an eos predicted by the last token of each assistant turn that a user turn follows
    (the last turn ends with `</s>` in its text, which is itself supervised when it is the
    assistant's). Never supervised: role markers, user text and image slots.
    """
    ids: list[int] = []
    trained: list[bool] = []  # the official `context == 0`
    for index, msg in enumerate(conversations):
        text = msg["content"] + (tokenizer.eos_token if index == len(conversations) - 1 else "")
        marker_ids = _encode_without_bos(tokenizer, ROLE_MARKERS[msg["role"]])
        text_ids = _encode_without_bos(tokenizer, text)
        ids += marker_ids + text_ids
        trained += [False] * len(marker_ids) + [msg["role"] == "assistant"] * len(text_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i in range(1, len(ids)):
        if trained[i]:
            labels[i] = ids[i]
        elif trained[i - 1]:  # an assistant turn just ended: its last token predicts eos
            labels[i] = tokenizer.eos_token_id
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def count_image_placeholders(input_ids: list[int], tokenizer) -> int:
    return sum(1 for token in input_ids if token == tokenizer.im_start_id)


# ---------------------------------------------------------------- Axolotl strategy


class MiniCPMVChatStrategy(PromptTokenizingStrategy):
    """Tokenizes one prepared row (`id`, `image`, `image_sizes`, `conversations`).

    Output columns: input_ids, attention_mask, labels, and `id`, `image`, `image_sizes` for the
    collator. Rows are never truncated (a cut could fall inside an image placeholder): the ones
    longer than `sequence_len` are dropped by MiniCPMVChatDatasetStrategy, which load() returns.
    """

    def __init__(self, tokenizer, sequence_len: int, max_slice_nums: int = 9):
        super().__init__(None, tokenizer, train_on_inputs=False, sequence_len=sequence_len)
        for attr in ("im_start", "im_end", "slice_start", "slice_end", "im_start_id"):
            if not hasattr(tokenizer, attr):
                raise TypeError(
                    f"{DATASET_TYPE} needs the MiniCPM-V tokenizer (it has no `{attr}`); "
                    "load the model with `plugins: [axolotl_minicpmv.MiniCPMVPlugin]`"
                )
        self.processor = MiniCPMVProcessor(tokenizer, max_slice_nums=max_slice_nums)

    def tokenize_prompt(self, prompt: dict[str, Any]) -> dict[str, Any]:
        missing = [c for c in PREPARED_COLUMNS if c not in prompt]
        if missing:
            raise InvalidInputError(
                f"{DATASET_TYPE}: rows lack {missing}: this dataset did not go through "
                "axolotl_minicpmv.integration.data.prepare_minicpmv_datasets, which the MiniCPMVPlugin runs before the data "
                "loads (is `plugins: [axolotl_minicpmv.MiniCPMVPlugin]` in the config?)"
            )
        sample_id = prompt["id"]
        images, sizes = list(prompt["image"] or []), [tuple(s) for s in prompt["image_sizes"] or []]
        placeholders = [self.processor.image_placeholder(size) for size in sizes]
        try:
            conversations = expand_image_tags(prompt["conversations"], placeholders)
        except InvalidInputError as err:
            raise InvalidInputError(f"sample {sample_id!r}: {err}") from None
        row = build_ids_and_labels(self.tokenizer, conversations)
        found = count_image_placeholders(row["input_ids"], self.tokenizer)
        expected = sum(p.count(self.tokenizer.im_start) for p in placeholders)
        if found != expected:
            raise InvalidInputError(
                f"sample {sample_id!r}: {found} {IMAGE_TAG!r} tokens in the ids but {expected} image placeholders were placed"
            )
        return {**row, "id": sample_id, "image": images, "image_bytes": list(prompt.get("image_bytes") or []), "image_sizes": [list(s) for s in sizes]}


class MiniCPMVChatDatasetStrategy(DatasetWrappingStrategy):
    """Runs Axolotl's TokenizedPromptDataset with our strategy, then drops and counts over-long rows.

    Dropping here, before Axolotl's length handling, means `excess_length_strategy: truncate` never
    truncates our samples; `excess_length_strategy: raise` raises naming them.
    """

    def __init__(self, strategy: MiniCPMVChatStrategy, excess_length_strategy: str = "drop", name: str = DATASET_TYPE):
        self.strategy = strategy
        self.excess_length_strategy = excess_length_strategy
        self.name = name

    def wrap_dataset(self, dataset, process_count: int | None = None, keep_in_memory: bool | None = False, **kwargs):
        tokenized = TokenizedPromptDataset(
            self.strategy, dataset, process_count=process_count, keep_in_memory=keep_in_memory
        )
        limit = self.strategy.sequence_len
        lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_pylist()
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if not too_long:
            return tokenized
        ids = list(tokenized.select(too_long)["id"])
        if self.excess_length_strategy == "raise":
            raise ValueError(
                f"{self.name}: {len(too_long)} samples are longer than sequence_len {limit} "
                f"(excess_length_strategy: raise): {ids}"
            )
        # logged here, in the main process: the tokenizing workers' logs may be lost or cached away
        for index, sample_id in zip(too_long, ids):
            LOG.warning(
                f"{self.name}: dropping sample {sample_id!r}: {lengths[index]} tokens (image placeholders included) "
                f"> sequence_len {limit}; not truncated, a cut could split an image placeholder"
            )
        LOG.warning(
            f"{self.name}: dropped {len(too_long)} of {len(lengths)} samples longer than sequence_len {limit}. "
            "Raise sequence_len or lower minicpmv_max_slice_nums to keep them."
        )
        keep = [i for i, n in enumerate(lengths) if n <= limit]
        # flattened: Axolotl reads lengths straight from the Arrow table (get_dataset_lengths)
        return tokenized.select(keep).flatten_indices(keep_in_memory=bool(keep_in_memory))


def _is_test_dataset(cfg, ds_cfg) -> bool:
    tests = list(cfg.get("test_datasets") or [])
    if any(t is ds_cfg for t in tests):
        return True
    path = ds_cfg.get("path") if ds_cfg else None
    train_paths = {d.get("path") for d in cfg.get("datasets") or []}
    return path is not None and path not in train_paths and any(t.get("path") == path for t in tests)


def load(tokenizer, cfg, ds_cfg=None, processor=None):
    """Axolotl's entry point for `type: axolotl_minicpmv.minicpmv_chat`."""
    ds_cfg = ds_cfg or {}
    sequence_len = cfg.get("sequence_len") or 2048
    if cfg.get("eval_sequence_len") and _is_test_dataset(cfg, ds_cfg):
        sequence_len = cfg.get("eval_sequence_len")
    if cfg.get("train_on_inputs"):
        LOG.warning(f"{DATASET_TYPE}: train_on_inputs is ignored; the MiniCPM-V recipe supervises assistant turns only")
    strategy = MiniCPMVChatStrategy(tokenizer, sequence_len=sequence_len, max_slice_nums=max_slice_nums_from_cfg(cfg))
    return MiniCPMVChatDatasetStrategy(
        strategy,
        excess_length_strategy=(cfg.get("excess_length_strategy") or "drop").lower(),
        name=str(ds_cfg.get("path") or DATASET_TYPE),
    )
