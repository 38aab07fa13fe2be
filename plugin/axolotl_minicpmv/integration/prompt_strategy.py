"""Axolotl prompt strategy `type: axolotl_minicpmv.minicpmv_chat`: prepared samples -> ids and labels.

The ids and the label rule are `MiniCPMVProcessor.encode_training_conversation`'s (the official fine-tuning
code's, June 2024); labels are emitted unshifted (the model shifts). Reads rows prepared by `data.py`;
tests/test_prompt_strategy.py checks them against an official-style pre-shifted target.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
from axolotl.datasets import TokenizedPromptDataset
from axolotl.prompt_tokenizers import DatasetWrappingStrategy, PromptTokenizingStrategy
from axolotl.utils.logging import get_logger

from ..model.conversation import InvalidInputError
from ..model.image_processing_minicpmv import MiniCPMVImageProcessor
from ..model.processing_minicpmv import MiniCPMVProcessor
from .args import image_processor_for
from .data import DATASET_TYPE

LOG = get_logger(__name__)

PREPARED_COLUMNS = ("id", "image", "image_sizes", "conversations")


class MiniCPMVChatStrategy(PromptTokenizingStrategy):
    """Tokenizes one prepared row (`id`, `image`, `image_sizes`, `conversations`) through `MiniCPMVProcessor`.

    Output columns: input_ids, attention_mask, labels, and `id`, `image`, `image_sizes` for the
    collator. Rows are never truncated (a cut could fall inside an image placeholder): the ones
    longer than `sequence_len` are dropped by MiniCPMVChatDatasetStrategy, which load() returns.
    """

    def __init__(
        self, tokenizer, sequence_len: int, max_slice_nums: int | None = None, image_processor: MiniCPMVImageProcessor | None = None
    ):
        super().__init__(None, tokenizer, train_on_inputs=False, sequence_len=sequence_len)
        image_processor = image_processor or MiniCPMVImageProcessor()
        if max_slice_nums is not None:
            image_processor = MiniCPMVImageProcessor(**{**image_processor.to_dict(), "max_slice_nums": max_slice_nums})
        try:
            self.processor = MiniCPMVProcessor(image_processor, tokenizer)
        except TypeError as err:
            raise TypeError(f"{DATASET_TYPE}: {err}; is `plugins: [axolotl_minicpmv.MiniCPMVPlugin]` in the config?") from None

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
        layouts = [self.processor.layout(size) for size in sizes]
        try:
            row = self.processor.encode_training_conversation(prompt["conversations"], layouts)
        except InvalidInputError as err:
            raise InvalidInputError(f"sample {sample_id!r}: {err}") from None
        return {
            **row,
            "id": sample_id,
            "image": images,
            "image_bytes": list(prompt.get("image_bytes") or []),
            "image_sizes": [list(s) for s in sizes],
        }


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
        tokenized = TokenizedPromptDataset(self.strategy, dataset, process_count=process_count, keep_in_memory=keep_in_memory)
        limit = self.strategy.sequence_len
        lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_pylist()
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if not too_long:
            return tokenized
        ids = list(tokenized.select(too_long)["id"])
        if self.excess_length_strategy == "raise":
            raise ValueError(
                f"{self.name}: {len(too_long)} samples are longer than sequence_len {limit} (excess_length_strategy: raise): {ids}"
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
    strategy = MiniCPMVChatStrategy(tokenizer, sequence_len=sequence_len, image_processor=image_processor_for(cfg))
    return MiniCPMVChatDatasetStrategy(
        strategy,
        excess_length_strategy=(cfg.get("excess_length_strategy") or "drop").lower(),
        name=str(ds_cfg.get("path") or DATASET_TYPE),
    )
