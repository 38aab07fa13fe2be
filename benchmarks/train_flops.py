"""Model FLOPs of a training sample of the LoRA recipe, for bench_train.py's FLOPs per sample and MFU.

Model FLOPs count the matrix products the recipe needs, not what an implementation spends (recomputation under
gradient checkpointing is left out, as MFU is usually defined). One multiply-add is 2 FLOPs; a backward pass
costs twice its forward pass when it computes both input and weight gradients, once when the weights are frozen:

- vision tower (trained in full): 3 x forward, forward = 2 x linear weights x patches + 4 x patches^2 x width x blocks
  (the scores and the weighted sum of every attention layer), per vision image (source and slices);
- resampler (trained in full): 3 x 2 x its weights x patches per vision image (an upper bound: not every weight sees
  every patch);
- decoder (frozen, LoRA on the targets): forward plus input gradients, 2 x (2 x linear weights x tokens
  + 4 x tokens^2 x hidden x layers), and 3 x 2 x LoRA weights x tokens;
- lm_head (frozen): 2 x 2 x hidden x vocab over the supervised tokens only (the loss computes logits only there).

Embedding lookups, norms, activations and the optimizer are left out (a few per cent at most).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs count needs from the model: weight counts per part and attention widths."""

    vision_linear: int  # weights of the tower's matrix products (patch embedding included)
    vision_width: int
    vision_blocks: int
    resampler: int
    decoder_linear: int  # weights of the decoder layers' matrix products
    hidden: int
    layers: int
    vocab: int
    lora: int  # LoRA weights (A and B) of the targets
    patch_size: int


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def model_shape(config, lora_r: int, lora_targets) -> ModelShape:
    """Counts from the model built for `config` on the meta device (no memory, no weights)."""
    from axolotl_minicpmv import MiniCPMV
    from axolotl_minicpmv.integration.lora_targets import expand_targets, resolve_targets

    with torch.device("meta"):
        model = MiniCPMV(config)
    modules = dict(model.named_modules())
    lora = sum(
        lora_r * (modules[name].in_features + modules[name].out_features) for name in resolve_targets(model, expand_targets(lora_targets))
    )
    return ModelShape(
        vision_linear=_linear_weights(model.vpm.patch_embed) + _linear_weights(model.vpm.blocks),
        vision_width=model.vpm.embed_dim,
        vision_blocks=len(model.vpm.blocks),
        resampler=sum(p.numel() for p in model.resampler.parameters()),
        decoder_linear=_linear_weights(model.llm.model.layers),
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        lora=lora,
        patch_size=config.patch_size,
    )


def sample_flops(shape: ModelShape, image_sizes: Iterable[tuple[int, int]], tokens: int, supervised: int) -> dict[str, float]:
    """FLOPs of one training sample by part: its vision images' (height, width) in pixels, its token count and
    its supervised (labelled) token count."""
    vision = resampler = 0.0
    for height, width in image_sizes:
        patches = (height // shape.patch_size) * (width // shape.patch_size)
        forward = 2 * shape.vision_linear * patches + 4 * patches**2 * shape.vision_width * shape.vision_blocks
        vision += 3 * forward
        resampler += 3 * 2 * shape.resampler * patches
    decoder_forward = 2 * shape.decoder_linear * tokens + 4 * tokens**2 * shape.hidden * shape.layers
    decoder = 2 * decoder_forward + 3 * 2 * shape.lora * tokens
    lm_head = 2 * 2 * shape.hidden * shape.vocab * supervised
    parts = {"vision": vision, "resampler": resampler, "decoder": decoder, "lm_head": lm_head}
    return {**parts, "total": sum(parts.values())}


def dataset_flops(shape: ModelShape, processor, rows: list[dict], image_loader) -> dict[str, float]:
    """Mean FLOPs per sample over seed-format rows (`conversations`, one `image` path each), tokenized as the
    recipe trains them (`MiniCPMVProcessor` training rows)."""
    totals: dict[str, float] = {}
    for row in rows:
        features = processor([row["conversations"]], [[image_loader(row["image"])]], return_labels=True)
        sizes = [tuple(stack.shape[-2:]) for stack in features["pixel_values"] for _ in range(stack.shape[0])]
        tokens = int(features["attention_mask"].sum())
        supervised = int((features["labels"] != -100).sum())
        for part, value in sample_flops(shape, sizes, tokens, supervised).items():
            totals[part] = totals.get(part, 0.0) + value
    return {part: value / len(rows) for part, value in totals.items()}
