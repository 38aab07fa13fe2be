"""The plugin's YAML keys, their defaults and their checks, in one place.

Axolotl drops undeclared keys silently, so every key is declared here. `MiniCPMVArgs` is merged into
Axolotl's config schema (its validators run on the whole config there), and `MiniCPMVArgs.from_cfg`
validates a raw config the same way where the plugin runs before Axolotl's validation (`register`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .lora_targets import PRESETS


class MiniCPMVArgs(BaseModel):
    """Plugin settings; the defaults reproduce the official LoRA recipe."""

    model_config = ConfigDict(extra="ignore")

    minicpmv_tune_vision: bool = Field(default=True, description="Train the SigLIP vision tower (vpm) in full; saved inside the adapter.")
    minicpmv_tune_resampler: bool = Field(default=True, description="Train the resampler in full; saved inside the adapter.")
    minicpmv_tune_embed_tokens: bool = Field(default=True, description="Train llm.model.embed_tokens in full; saved inside the adapter.")
    minicpmv_max_slice_nums: int | None = Field(
        default=None, description="Most slices per image, 1 to 9 (default: the checkpoint's own, 9 in the official release)."
    )
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

    minicpmv_eval_generate: int | None = Field(
        default=None,
        description="At each evaluation, greedy answers for the first N eval samples, logged as eval_exact and eval_rouge_l (off by default).",
    )

    @field_validator("minicpmv_eval_generate", mode="before")
    @classmethod
    def _eval_generate_count(cls, value):
        if value is None or value is False:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"minicpmv_eval_generate must be a positive number of eval samples (or unset), got {value!r}")
        return value

    @field_validator("minicpmv_max_slice_nums", mode="before")
    @classmethod
    def _slices_in_range(cls, value):
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"minicpmv_max_slice_nums must be a positive integer, got {value!r}")
        if value > 9:
            raise ValueError(f"minicpmv_max_slice_nums must be between 1 and 9 (the model's own limit), got {value}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_settings_that_cannot_work(cls, data):
        """Axolotl settings this model cannot train with, each with the fix."""
        if not isinstance(data, Mapping):
            return data
        if data.get("sample_packing"):
            raise ValueError("sample_packing: true is not supported with MiniCPM-V (image slots cannot be packed); set it to false")
        if data.get("torch_compile") in (True, "auto"):
            raise ValueError(
                "torch_compile: true (or auto) would compile the whole model, whose image placement depends on the data; "
                "set minicpmv_compile_layers: true instead (compiles the decoder layers in place)"
            )
        if data.get("lora_target_linear"):
            raise ValueError(
                "lora_target_linear: true would put LoRA on the vision tower and resampler too; "
                f"use lora_target_modules with a regex or a preset ({', '.join(PRESETS)})"
            )
        return data

    @classmethod
    def from_cfg(cls, cfg) -> MiniCPMVArgs:
        """The validated plugin settings of an Axolotl config (raw dict, DictDefault or the validated config)."""
        data = cfg if isinstance(cfg, Mapping) else vars(cfg)
        return cls.model_validate({k: v for k, v in data.items() if v is not None})

    @property
    def fully_trained_modules(self) -> list[str]:
        """Modules trained in full besides LoRA (PEFT's modules_to_save), in the official recipe's order."""
        wanted = {
            "vpm": self.minicpmv_tune_vision,
            "resampler": self.minicpmv_tune_resampler,
            "embed_tokens": self.minicpmv_tune_embed_tokens,
        }
        return [name for name, on in wanted.items() if on]


def modules_to_save(cfg) -> list[str]:
    """The fully trained modules (PEFT's modules_to_save) that the config's `minicpmv_tune_*` keys ask for."""
    return MiniCPMVArgs.from_cfg(cfg).fully_trained_modules


def cfg_value(cfg, key: str, default=None):
    """`cfg[key]` of an Axolotl config (DictDefault, plain dict or attribute object); `default` when unset or None."""
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def image_processor_for(cfg):
    """The checkpoint's image processor (`base_model`'s preprocessor or config; the official defaults when the config
    names no model), with `minicpmv_max_slice_nums` applied: prompt strategy and collator build from the same one."""
    from ..model.image_processing_minicpmv import MiniCPMVImageProcessor

    settings = MiniCPMVArgs.from_cfg(cfg)
    base = cfg_value(cfg, "base_model")
    override = {"max_slice_nums": settings.minicpmv_max_slice_nums}
    if base is None:
        return MiniCPMVImageProcessor.from_model_config({}, **override)
    return MiniCPMVImageProcessor.from_pretrained(str(base), **override)
