"""MiniCPM-V 2.0 for vLLM, built from vLLM's own MiniCPM-V pieces with the four places where they differ from
the official code put right (README.md beside this file lists the defects):

- the resampler is adaptive: key positions are the 2-D sin-cos table of each image's own patch grid
  (vLLM builds 2.0's `Resampler2` with `adaptive=False`, an interpolated fixed 8x8 table);
- the decoder's last hidden state is divided by `hidden_size / dim_model_base` before `lm_head`
  (vLLM's MiniCPM-V forward calls `llm.model`, skipping the division `MiniCPMForCausalLM.forward` does);
- the SigLIP tower is created from the config (`vision_encoder` plus the `vision_config` timm overrides of
  small checkpoints) in the model's dtype (vLLM hard-codes the full so400m tower);
- the class carries `packed_modules_mapping` itself (vLLM's `MiniCPMV.__new__` reads it off `MiniCPMV2_0`,
  which has none, so 2.0 does not load at all).

Module names stay `llm.`, `vpm.`, `resampler.`: official checkpoints and our merged exports load unchanged.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from vllm.model_executor.layers.resampler import Resampler2
from vllm.model_executor.models.minicpm import MiniCPMForCausalLM
from vllm.model_executor.models.minicpmv import (
    MiniCPMV,
    MiniCPMV2_0,
    get_version_by_config,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...model.modeling_minicpmv import build_vision_tower
from .processing import (
    MiniCPMV2DummyInputsBuilder,
    MiniCPMV2MultiModalProcessor,
    MiniCPMV2ProcessingInfo,
)


@MULTIMODAL_REGISTRY.register_processor(
    MiniCPMV2MultiModalProcessor,
    info=MiniCPMV2ProcessingInfo,
    dummy_inputs=MiniCPMV2DummyInputsBuilder,
)
class MiniCPMV2ForVLLM(MiniCPMV2_0):
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {k: list(v) for k, v in MiniCPMForCausalLM.packed_modules_mapping.items()}
    embedding_modules: ClassVar[dict[str, str]] = {}

    def __new__(cls, *, vllm_config, prefix: str = ""):
        # Registered under the official architecture name "MiniCPMV", which all MiniCPM-V versions share:
        # versions other than 2.0 get vLLM's own class, as without this plugin.
        if get_version_by_config(vllm_config.model_config.hf_config) != (2, 0):
            return MiniCPMV(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    def init_vision_module(self, config, quant_config, prefix: str = "") -> nn.Module:
        # our own tower builder: the official layout (no pooling head, last block dropped) with the config's sizes
        return build_vision_tower(config).to(dtype=torch.get_default_dtype())

    def init_resampler(self, embed_dim: int, vision_dim: int, quant_config=None, prefix: str = "") -> nn.Module:
        resampler = Resampler2(
            embed_dim=embed_dim,
            num_heads=embed_dim // 128,
            grid_size=int(math.sqrt(self.config.query_num)),
            kv_dim=vision_dim,
            adaptive=True,  # the official 2.0 resampler: position table per patch grid
            do_post_projection=True,
            quant_config=quant_config,
            prefix=prefix,
        )
        return resampler.to(dtype=torch.get_default_dtype())

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        # MiniCPMForCausalLM.forward (not .model) divides the last hidden state by hidden_size / dim_model_base
        return self.llm(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
        )
