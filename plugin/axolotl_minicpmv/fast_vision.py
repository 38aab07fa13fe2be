"""The vision tower for `chat(fast=True)`: its transformer blocks run through one compiled function.

Eager, each block is a dozen small kernels launched from Python, so on a slow host the tower waits on
the CPU. Compiling the whole tower for dynamic image sizes took minutes on the H100 machine (symbolic
position-embedding interpolation); compiling one block with a dynamic batch and sequence length takes
seconds (20 s there) and serves all 26 blocks and every image size. Patch and position embedding, the
final norm and the resampler stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _run_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return block(hidden)


def image_encoder(model, compile_blocks: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function equal to `model.encode_images` ((n, 3, H, W) same-size pixels -> resampler outputs)."""
    run_block = torch.compile(_run_block, dynamic=True) if compile_blocks else _run_block
    tower = model.vpm

    def encode(stack: torch.Tensor) -> torch.Tensor:
        # timm's VisionTransformer.forward_features / forward_head, with the blocks called one by one.
        hidden = tower.patch_embed(stack.to(tower.pos_embed.dtype))
        hidden = tower.norm_pre(tower.patch_drop(tower._pos_embed(hidden)))
        for block in tower.blocks:
            hidden = run_block(block, hidden)
        return model.resample(tower.forward_head(tower.norm(hidden)), stack.shape[-2:])

    return encode
