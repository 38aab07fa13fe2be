"""float32 weights for the modules a LoRA run trains in full, when nothing else keeps a float32 copy of them.

The recipe trains the vision tower, the resampler and the token embeddings in full at lr 1e-6. In bf16 a weight
of 0.02 moves in steps of about 1e-4, so AdamW's updates of about 1e-6 round away: the modules would never change.
DeepSpeed's bf16/fp16 optimizers keep float32 master weights (every shipped config but QLoRA uses ZeRO), and
QLoRA's `prepare_model_for_kbit_training` casts them to float32 itself. A run without either (`bf16: true` or
`fp16: true`, no `deepspeed`) would train them in 16 bits, so their weights are made float32 here: the trainer's
autocast still computes in 16 bits, and the optimizer updates the float32 weights, as mixed precision intends.
"""

from __future__ import annotations

import torch
from axolotl.utils.logging import get_logger

from .args import cfg_value

LOG = get_logger(__name__)
HALF = (torch.bfloat16, torch.float16)


def keep_trained_weights_float32(cfg, model: torch.nn.Module) -> int:
    """Cast the 16-bit trainable weights of an adapter run to float32 when the trainer runs autocast without
    DeepSpeed or FSDP (see the module doc); returns how many parameters were cast."""
    if cfg_value(cfg, "adapter") not in ("lora", "qlora"):
        return 0
    if cfg_value(cfg, "deepspeed") or cfg_value(cfg, "fsdp_config") or cfg_value(cfg, "fsdp"):
        return 0  # DeepSpeed keeps float32 master weights; FSDP's mixed precision manages the dtypes itself
    # the trainer's autocast as Axolotl sets it: bf16 from `bf16` or its alias `bfloat16`, else fp16
    if not any(cfg_value(cfg, key) is True for key in ("bf16", "bfloat16", "fp16")):
        return 0  # no autocast would compute float32 weights in 16 bits
    half_trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.dtype in HALF]
    if not half_trained:
        return 0
    for _, param in half_trained:
        param.data = param.data.float()
    count = sum(p.numel() for _, p in half_trained)
    LOG.info(
        "MiniCPM-V: %s trained parameters (%s) kept in float32 for the optimizer, without DeepSpeed's float32 copy; "
        "autocast computes with them in 16 bits",
        f"{count:,}",
        ", ".join(sorted({_module_label(name) for name, _ in half_trained})),
    )
    return count


def _module_label(name: str) -> str:
    """`base_model.model.vpm.modules_to_save.default.blocks.0...` -> `vpm`; an adapter's own weights -> `LoRA`."""
    if ".modules_to_save" not in name:
        return "LoRA"
    return name.split(".modules_to_save")[0].removeprefix("base_model.model.")
