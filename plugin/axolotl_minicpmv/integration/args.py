"""YAML keys of the MiniCPM-V plugin (Axolotl drops undeclared keys silently, so all are declared here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class MiniCPMVArgs(BaseModel):
    """Plugin settings; the defaults reproduce the official LoRA recipe."""

    minicpmv_tune_vision: bool = Field(default=True, description="Train the SigLIP vision tower (vpm) in full; saved inside the adapter.")
    minicpmv_tune_resampler: bool = Field(default=True, description="Train the resampler in full; saved inside the adapter.")
    minicpmv_tune_embed_tokens: bool = Field(default=True, description="Train llm.model.embed_tokens in full; saved inside the adapter.")
    minicpmv_max_slice_nums: int = Field(default=9, description="Most slices per image (the model's own limit is 9).")
    minicpmv_skip_bad_samples: bool = Field(default=False, description="Skip (and log) invalid samples instead of stopping.")
    minicpmv_format: Literal["auto", "seed", "llava", "messages", "content_parts"] = Field(
        default="auto",
        description="Data format of the minicpmv_chat datasets: auto (detected per row), seed (official: conversations of role/content), "
        "llava (conversations of from/value), messages (messages + images, LLaMA-Factory / ms-swift), content_parts (OpenAI / Axolotl "
        "content lists). A dataset entry's own `minicpmv_format` wins.",
    )
    minicpmv_image_root: str | None = Field(
        default=None,
        description="Folder that relative image paths resolve against (default: the data file's folder; needed for hub datasets "
        "that name image files). A dataset entry's own `minicpmv_image_root` wins.",
    )
    minicpmv_compile_layers: bool = Field(
        default=False,
        description="Compile the decoder layers in place (regional torch.compile): faster steps without gradient checkpointing, after a minute or two of compilation.",
    )

    @field_validator("minicpmv_max_slice_nums")
    @classmethod
    def _slices_in_range(cls, value: int) -> int:
        if not 1 <= value <= 9:
            raise ValueError(f"minicpmv_max_slice_nums must be between 1 and 9, got {value}")
        return value


def cfg_value(cfg, key: str, default=None):
    """`cfg[key]` of an Axolotl config (DictDefault, plain dict or attribute object); `default` when unset or None."""
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value
