"""vLLM's MiniCPM-V multimodal processor with our own 2.0 image processing in place of remote code.

vLLM's processor asks the model folder for an image processor class (`preprocessor_config.json`'s `auto_map`,
remote code, `--trust-remote-code`); for 2.0 this one slices and normalises images with this package's
`MiniCPMVProcessor` (the same code our transformers model and training use), so a folder needs no Python
files. Placeholder matching and multimodal fields stay vLLM's; what differs for 2.0 is the image marker in
prompts (`IMAGE_PATTERN`) and how cached images get their placeholder back. Other MiniCPM-V versions keep vLLM's
behaviour unchanged.
"""

from __future__ import annotations

from functools import cached_property

import torch
from vllm.model_executor.models.minicpmv import (
    MiniCPMVDummyInputsBuilder,
    MiniCPMVImageEmbeddingItems,
    MiniCPMVMultiModalProcessor,
    MiniCPMVProcessingInfo,
)
from vllm.multimodal.parse import ImageProcessorItems, ImageSize
from vllm.multimodal.processing.processor import BaseMultiModalProcessor

from ...model.processing_minicpmv import MiniCPMVProcessor

MiniCPMV2DummyInputsBuilder = MiniCPMVDummyInputsBuilder


class MiniCPMV2ImageProcessor:
    """What vLLM's MiniCPM-V code reads off an image processor, for 2.0, from our processor."""

    im_start_token = "<image>"
    im_end_token = "</image>"

    def __init__(self, processor: MiniCPMVProcessor):
        self.processor = processor
        self.image_feature_size = processor.query_num
        self.max_slice_nums = processor.image_processor.max_slice_nums

    def get_sliced_grid(self, image_size: ImageSize) -> tuple[int, int] | None:
        return self.processor.layout((image_size.width, image_size.height)).grid

    def get_slice_image_placeholder(self, image_size: ImageSize) -> str:
        return self.processor.image_placeholder((image_size.width, image_size.height))


class MiniCPMV2HFProcessor:
    """Stands where vLLM expects the checkpoint's HF processor: the tokenizer and the image processor."""

    def __init__(self, tokenizer, config):
        self.tokenizer = tokenizer
        self.processor = MiniCPMVProcessor.from_config(tokenizer, config)
        self.image_processor = MiniCPMV2ImageProcessor(self.processor)


def _is_2_0(info: MiniCPMVProcessingInfo) -> bool:
    return info.get_model_version() == (2, 0)


# Where an image goes in a 2.0 prompt: vLLM expands it into the official placeholder. Special tokens only, so it
# tokenizes the same alone and in context: vLLM's "(<image>./</image>)" does not (the Llama tokenizer puts a
# "▁" before "(" at the start of a string but not after "<用户>"), and its expansion then fails. Our chat template
# turns vLLM's chat placeholder "(<image>./</image>)" into this one.
IMAGE_PATTERN = "<image></image>"


class MiniCPMV2ProcessingInfo(MiniCPMVProcessingInfo):
    @property
    def image_pattern(self) -> str:
        return IMAGE_PATTERN if _is_2_0(self) else MiniCPMVProcessingInfo.image_pattern

    @cached_property
    def _minicpmv2_processor(self) -> MiniCPMV2HFProcessor:
        return MiniCPMV2HFProcessor(self.get_tokenizer(), self.get_hf_config())

    def get_hf_processor(self, **kwargs: object):
        if not _is_2_0(self):
            return super().get_hf_processor(**kwargs)
        # the config's slicing (max_slice_nums) for every request: vLLM lays out placeholders without kwargs
        return self._minicpmv2_processor

    def get_image_max_slice_num(self) -> int:
        # the 2.0 config key is `max_slice_nums` (plural); vLLM reads `max_slice_num`
        if _is_2_0(self):
            return self.get_hf_config().max_slice_nums
        return super().get_image_max_slice_num()


class MiniCPMV2MultiModalProcessor(MiniCPMVMultiModalProcessor):
    def process_images(self, mm_data, mm_kwargs):
        if not _is_2_0(self.info):
            return super().process_images(mm_data, mm_kwargs)
        if (images := mm_data.get("images")) is None:
            return {}
        items = self.info.parse_mm_data({"image": images}, validate=False)
        parsed = items.get_items("image", (MiniCPMVImageEmbeddingItems, ImageProcessorItems))
        if isinstance(parsed, MiniCPMVImageEmbeddingItems):
            return {}
        processor = self.info.get_hf_processor(**mm_kwargs).processor
        patch = processor.image_processor.patch_size
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for index in range(len(parsed)):
            image = parsed.get(index).convert("RGB")
            # source image, then the slice cells row by row: each (3, H, W) at its own size
            pixels = processor.pixel_values(image)
            pixel_values.append(pixels)
            image_sizes.append(torch.tensor([image.width, image.height]))
            tgt_sizes.append(torch.tensor([[p.shape[-2] // patch, p.shape[-1] // patch] for p in pixels]))
        return {"pixel_values": pixel_values, "image_sizes": image_sizes, "tgt_sizes": tgt_sizes}

    def _recompute_cached_prompt_update(self, cached_update, new_item_idx: int):
        if not _is_2_0(self.info):
            return super()._recompute_cached_prompt_update(cached_update, new_item_idx)
        # A 2.0 placeholder depends on the image size only (no image ids): keep the cached tokens as they are.
        # vLLM's override decodes and re-encodes them, which changes the ids of images sliced into several rows.
        return BaseMultiModalProcessor._recompute_cached_prompt_update(self, cached_update, new_item_idx)
