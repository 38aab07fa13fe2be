"""The vision tower over all of a batch's images in one pass: patches of every size packed into one sequence.

A training batch of the recipe holds images of 2-4 sizes (a resized source picture and its slices), and the
tower ran once per size: every block's kernels launched 2-4 times, in a step bound by kernel launches
(benchmarks/RESULTS.md). Packed, the token-wise layers (norms, qkv, MLP, their LayerScale and residuals) run
once over every patch of the batch, and attention stays inside each image through flash attention's
variable-length kernel (`torch.nn.attention.varlen`, CUDA, 16-bit), so each image sees exactly what its own
pass would. Patch and position embedding (size-dependent), the final norm and the head run per size as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .transfer import to_device

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """(T, heads, head_dim) packed queries/keys/values -> attention within each [cu_seqlens[i], cu_seqlens[i+1]) span."""
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """The same as `varlen_attention`, one SDPA call per span: for devices and dtypes the kernel lacks, and for tests."""
    bounds = cu_seqlens.tolist()
    spans = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q_, k_, v_ = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, L, head_dim)
        spans.append(nn.functional.scaled_dot_product_attention(q_, k_, v_).transpose(0, 1))
    return torch.cat(spans)


def packs(tower: nn.Module, pixels: torch.Tensor) -> bool:
    """Whether `varlen_attention` can run this tower's blocks on `pixels`' device and dtype (timm ViT blocks
    without attention dropout or gating; flash attention: CUDA, 16-bit, head size a multiple of 8 up to 256). The
    dtype is autocast's where it runs (float32 weights trained in mixed precision compute in 16 bits)."""
    attn = tower.blocks[0].attn
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else tower.pos_embed.dtype
    return (
        varlen_attn is not None
        and pixels.is_cuda
        and dtype in (torch.float16, torch.bfloat16)
        and attn.head_dim % 8 == 0
        and attn.head_dim <= 256
        and getattr(attn, "gate", None) is None
        and attn.attn_drop.p == 0.0
    )


def embed_patches(tower: nn.Module, stack: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) same-size pixels -> (n, patches, C) block inputs: timm's `forward_features` up to its blocks."""
    hidden = tower.patch_embed(stack.to(tower.pos_embed.dtype))
    return tower.norm_pre(tower.patch_drop(tower._pos_embed(hidden)))


def packed_block(block: nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, attention: Attention) -> torch.Tensor:
    """timm's `Block.forward` on (T, C) packed patches, attention confined to each image's span."""
    attn = block.attn
    qkv = attn.qkv(block.norm1(hidden)).unflatten(-1, (3, attn.num_heads, attn.head_dim))
    q, k, v = qkv.unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mixed = attention(q, k, v, cu_seqlens, max_len).flatten(1)
    hidden = hidden + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(mixed)))))
    return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))


def encode_packed(
    tower: nn.Module, stacks: list[torch.Tensor], attention: Attention = varlen_attention, run_block: Callable = packed_block
) -> list[torch.Tensor]:
    """Tower features (n, patches, C) of each same-size stack, as `tower(stack)` gives them, from one packed pass.

    `run_block` is `packed_block` or its compiled equal; the tower's gradient-checkpointing switch applies.
    """
    embedded = [embed_patches(tower, stack) for stack in stacks]
    lengths = [length for e in embedded for length in [e.shape[1]] * e.shape[0]]  # one span per image
    cu_seqlens = to_device(torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32), embedded[0].device)
    hidden = torch.cat([e.flatten(0, 1) for e in embedded])
    max_len = max(lengths)
    checkpointing = getattr(tower, "grad_checkpointing", False) and torch.is_grad_enabled()
    for block in tower.blocks:
        if checkpointing:
            hidden = torch.utils.checkpoint.checkpoint(run_block, block, hidden, cu_seqlens, max_len, attention, use_reentrant=False)
        else:
            hidden = run_block(block, hidden, cu_seqlens, max_len, attention)
    hidden = tower.norm(hidden)
    sizes = [e.shape[0] * e.shape[1] for e in embedded]
    return [tower.forward_head(part.view(e.shape)) for part, e in zip(hidden.split(sizes), embedded, strict=True)]
