"""The attention mask of one decoding step that reads less than the whole static cache.

`decode_block_mask`: a flex-attention `BlockMask`, each row reads only the cache blocks it attends to (compiled
steps). `decode_window_mask`: a dense mask over the cache's first positions only (the recorded eager step).

A static cache is sized for the longest request it serves, and a batch's rows are left-padded to its longest
prompt, so a dense mask makes every step read every row's whole cache: at batch 16 over a 1,024-position cache
that is 6 GB of keys and values a step, about as much as the weights (benchmarks/RESULTS.md). Here the blocks
of 128 positions that hold nothing a row can see (its left padding, the cache's unwritten tail) are left out of
the mask, and flex attention's decoding kernel skips them; `mask_mod` hides the rest of the (at most two) blocks
a row sees in part.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK = 128  # flex attention's default sparse block; cache lengths are multiples of it


def decode_block_mask(padding: torch.Tensor, position: torch.Tensor) -> BlockMask:
    """The mask of a step whose one query per row sits at cache index `position` (0-dim tensor, all rows alike):
    row b sees index j where `padding[b, j]` is set and j <= position. `padding`: (batch, cache length), 0 over
    a row's left padding. Fixed shapes and no host synchronisation, so it compiles and records into the
    decoding step's CUDA graph."""
    rows, length = padding.shape
    if length % BLOCK:
        raise ValueError(f"a block-sparse decoding mask needs a cache length that is a multiple of {BLOCK}, got {length}")
    visible = padding.bool() & (torch.arange(length, device=padding.device) <= position)
    per_block = visible.view(rows, length // BLOCK, BLOCK)
    full = per_block.all(-1)  # every position visible: no mask_mod needed
    partial = per_block.any(-1) & ~full  # the padding's edge and the query's own block

    def visited(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, 1, 1) counts and (rows, 1, 1, blocks) indices, the visited blocks first in cache order."""
        order = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None, None], order.to(torch.int32)[:, None, None]

    def mask_mod(batch, head, q_index, kv_index):
        return visible[batch, kv_index]

    return BlockMask.from_kv_blocks(
        *visited(partial), *visited(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(1, length), compute_q_blocks=False
    )


def decode_window_mask(padding: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean mask (batch, 1, 1, window) for a step whose query sits at cache index `position` (0-dim
    tensor, below the window), from `padding`, the loop's (batch, cache length) mask cut to the window: the
    attention reads the cache's first `window` positions only (MiniCPMAttention cuts its keys and values to
    the mask), so a cache sized for a long answer is not read past the window while the answer is short."""
    visible = padding.bool() & (torch.arange(padding.shape[1], device=padding.device) <= position)
    return visible[:, None, None, :]
