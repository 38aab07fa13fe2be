"""Perceiver resampler of MiniCPM-V 2.0: 64 learned queries attend to one image's patch features.

Parameter names (`query`, `pos_embed`, `proj`, `kv_proj`, `attn`, `ln_q`, `ln_kv`, `ln_post`) and the
2-D sin-cos tables (float32, numpy, as the release computes them) match the official checkpoint.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .transfer import to_device


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) float32 positions -> (M, dim): sines of the M positions on dim/2 frequencies, then cosines."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@lru_cache(maxsize=64)
def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """(height*width, dim) table, row-major over the grid: the column index encoded first, then the row."""
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


@lru_cache(maxsize=64)
def _pinned_sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    return sincos_2d.__wrapped__(dim, height, width).pin_memory()  # not also kept in sincos_2d's cache


def key_positions(dim: int, grid_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`sincos_2d` on `device`. A GPU gets it from a kept pinned copy through `to_device`: a blocking
    host-to-device copy waits for all queued GPU work, which in training stalled the host once per image size."""
    table = _pinned_sincos_2d(dim, *grid_size) if device.type == "cuda" else sincos_2d(dim, *grid_size)
    return to_device(table, device).to(dtype)


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        grid = int(num_queries**0.5)
        if grid * grid != num_queries:
            raise ValueError(f"query_num={num_queries} must be a square number")
        self.embed_dim = embed_dim
        # A parameter (frozen) rather than a buffer: the official checkpoint stores it. Created empty so a
        # device context applies, then filled with the 2-D sin-cos table (a standalone resampler needs it);
        # on the meta device the model's weight init or the checkpoint fills it instead.
        self.pos_embed = nn.Parameter(torch.empty(num_queries, embed_dim), requires_grad=False)
        if not self.pos_embed.is_meta:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(embed_dim, grid, grid))
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))

    def forward(self, features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """features: (N, H*W, kv_dim) of N images sharing the patch grid (H, W) -> (N, num_queries, embed_dim)."""
        key_pos = key_positions(self.embed_dim, grid_size, features.device, features.dtype)
        kv = self.ln_kv(self.kv_proj(features))
        queries = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(kv.shape[0], -1, -1)
        # need_weights=True (the default) keeps the plain matmul+softmax path the release runs: the fused
        # kernel behind need_weights=False rounds differently (about 3e-6 in fp32 features).
        out, _ = self.attn(queries, kv + key_pos, kv)
        return self.ln_post(out) @ self.proj
