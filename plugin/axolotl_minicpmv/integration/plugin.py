"""The Axolotl plugin: a thin switchboard from Axolotl's hooks to the MiniCPM-V modules.

`plugins: [axolotl_minicpmv.MiniCPMVPlugin]` in a YAML makes `axolotl train` load the native model
(no remote code), read the seed's `<image>` conversations, and train LoRA plus the fully trained
vision tower / resampler / embeddings as the official recipe does.
"""

from __future__ import annotations

import os

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.model_support.base import ModelSupport, Unsupported
from axolotl.model_support.profile import ModelProfile
from axolotl.model_support.registry import register_model_support
from axolotl.model_support.templates import VANILLA_CAUSAL_LM
from axolotl.utils.logging import get_logger

from . import lora_targets
from .args import MiniCPMVArgs

LOG = get_logger(__name__)


@register_model_support
class MiniCPMVSupport(ModelSupport):
    """Loaded through AutoModelForCausalLM (registered at import). Not declared multimodal: Axolotl's
    multimodal path would load the checkpoint's remote-code processor; the plugin brings its own
    prompt strategy and collator instead."""

    model_types = ("minicpmv",)
    profile = ModelProfile(
        family=VANILLA_CAUSAL_LM,
        capabilities={
            "lora_kernels": Unsupported("MiniCPM-V scales each residual branch; the fused LoRA kernels assume Llama's layer."),
            "cut_cross_entropy": Unsupported("CCE does not patch MiniCPM-V's logit scaling."),
            "liger": Unsupported("Liger's model patches do not cover MiniCPM-V."),
        },
    )


class MiniCPMVPlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "axolotl_minicpmv.integration.args.MiniCPMVArgs"

    def register(self, cfg: dict):
        """Fill in what the recipe needs before Axolotl validates the config (cfg is the raw YAML dict)."""
        from ..weights.export import refuse_axolotl_merge_lora

        refuse_axolotl_merge_lora(cfg)  # `axolotl merge-lora` would drop trained tensors: stop it, name the fix
        settings = MiniCPMVArgs.from_cfg(cfg)  # the checks Axolotl's own validation also runs, before anything loads
        if cfg.get("adapter") in ("lora", "qlora"):
            cfg["lora_target_modules"] = lora_targets.expand_targets(cfg.get("lora_target_modules"))
            cfg["lora_modules_to_save"] = lora_targets.merge_modules_to_save(
                cfg.get("lora_modules_to_save"), settings.fully_trained_modules
            )
        # The collator needs the image columns that the model's forward does not name.
        cfg["remove_unused_columns"] = False
        _pick_cpu_precision(cfg)
        # Validate and normalise the data now: bad samples stop the run before anything loads, and
        # `axolotl evaluate` (which skips the load_datasets hook) reads the prepared files too.
        from .data import prepare_minicpmv_datasets

        prepare_minicpmv_datasets(cfg)

    def pre_lora_load(self, cfg, model):
        if cfg.adapter not in ("lora", "qlora"):
            return  # Axolotl calls this hook on every run: full fine-tuning, or evaluating the base model
        lora_targets.check_targets(model, cfg.lora_target_modules)

    def post_lora_load(self, cfg, model):
        if cfg.adapter in ("lora", "qlora"):
            LOG.info("LoRA wrapped %s", lora_targets.describe_wrapped(model))

    def post_model_load(self, cfg, model):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            from .zero3 import prepare_for_zero3

            prepare_for_zero3(model)
        from .precision import keep_trained_weights_float32

        keep_trained_weights_float32(cfg, model)
        if cfg.minicpmv_compile_layers:
            from .compiled_layers import compile_decoder_layers

            LOG.info("MiniCPM-V: compiling %d decoder layers in place (the first steps run the compilation)", compile_decoder_layers(model))
            if cfg.gradient_checkpointing:
                LOG.warning(
                    "MiniCPM-V: with gradient checkpointing the compiled layers measured slower than eager ones; "
                    "compile without checkpointing, or leave minicpmv_compile_layers off"
                )
        total, trainable = lora_targets.count_parameters(model)
        LOG.info(
            "MiniCPM-V parameters: Total %s / Trainable %s (fully trained: %s)",
            f"{total:,}",
            f"{trainable:,}",
            cfg.lora_modules_to_save or "none",
        )

    def add_callbacks_pre_trainer(self, cfg, model):
        # Before the trainer exists, so the value is in the log line the progress printer writes.
        from .callbacks import ThroughputCallback

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return [ThroughputCallback(cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size)]

    def post_trainer_create(self, cfg, trainer):
        if cfg.minicpmv_eval_generate:
            from .eval_generate import add_eval_generate

            add_eval_generate(cfg, trainer)

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        from .collator import collator_cls_and_kwargs

        return collator_cls_and_kwargs(cfg)


def _pick_cpu_precision(cfg: dict) -> None:
    """On CPU, unset bf16/fp16 would become fp16 in Axolotl and train on NaNs: choose fp32 and say so."""
    if torch.cuda.is_available():
        return
    if cfg.get("fp16") is True:
        raise ValueError("fp16: true does not train on CPU (NaN gradients); remove it or set fp16: false to train in float32")
    if cfg.get("bf16") in (None, "auto") and cfg.get("fp16") is None:
        LOG.warning("MiniCPM-V plugin: no CUDA device and bf16/fp16 unset; training in float32 (bf16: false, fp16: false)")
        cfg["bf16"] = False
        cfg["fp16"] = False
