"""The vision tower of the fast paths: compiled blocks (batches: `generate_answers`), for `chat(fast=True)` replayed
from one CUDA graph per input shape.

Eager, each block is a dozen small kernels launched from Python, and the tower took as long to launch
as to run (benchmarks/RESULTS.md). Compiling the whole
tower for dynamic image sizes took minutes (symbolic position-embedding interpolation); compiling one
block with a dynamic batch and sequence length takes seconds and serves all 26 blocks and every image
size. Patch and position embedding, the final norm and the resampler stay eager. `GraphedEncoder` then
records the tower for a stack shape that comes again, so a request launches one graph instead of ~700 kernels
(one H200, a 448x448 picture: 3.6 ms against 14.4 through the compiled blocks, which are bound by launches).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ..model.packed_vision import embed_patches
from .cuda_graphs import record_cuda_graph


def _run_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return block(hidden)


def image_encoder(model, compile_blocks: bool, cuda_graphs: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function equal to `model.encode_images` ((n, 3, H, W) same-size pixels -> resampler outputs).

    With `cuda_graphs` the tower runs from a `GraphedEncoder` (`encode(stack, graphs=False)` runs the same
    compiled blocks without it: one compilation serves both); the resampler stays outside the graphs: it
    copies its position table from pinned host memory that a graph could outlive.
    """
    run_block = torch.compile(_run_block, dynamic=True) if compile_blocks else _run_block
    tower = model.vpm

    def features(stack: torch.Tensor) -> torch.Tensor:
        # timm's VisionTransformer.forward_features / forward_head, with the blocks called one by one.
        hidden = embed_patches(tower, stack)
        for block in tower.blocks:
            hidden = run_block(block, hidden)
        return tower.forward_head(tower.norm(hidden))

    graphed = GraphedEncoder(features) if cuda_graphs else None

    def encode(stack: torch.Tensor, graphs: bool = True) -> torch.Tensor:
        tower_out = graphed(stack) if graphs and graphed is not None else features(stack)
        return model.resample(tower_out, stack.shape[-2:])

    encode.graphed = graphed
    return encode


class GraphedEncoder:
    """`encode` (a GPU function of one tensor) replayed from a CUDA graph recorded per input shape.

    Recording runs `encode` twice on a side stream (compilation, cuBLAS set-up), then records it: three
    passes, worth paying for a shape that recurs. So a shape runs `encode` directly the first
    `record_after - 1` times it comes (a server's one-off picture sizes never pay) and is recorded the time
    after; the last `max_graphs` recorded shapes are kept. All graphs share one memory pool, which is safe
    because they replay one at a time on one stream and each result is copied out before the next replay.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 16, record_after: int = 2):
        self.encode = encode
        self.max_graphs, self.record_after = max_graphs, record_after
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # shapes not recorded yet -> times they came
        self._pool = torch.cuda.graph_pool_handle()

    def _record(self, example: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_input = example.clone()
        graph, static_output = record_cuda_graph(lambda: self.encode(static_input), warmup_runs=2, pool=self._pool)
        return graph, static_input, static_output

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        key = (tuple(stack.shape), stack.dtype, stack.device)
        if key not in self._graphs:
            seen = self._seen.pop(key, 0) + 1
            if seen < self.record_after:
                self._seen[key] = seen
                if len(self._seen) > 16 * self.max_graphs:
                    self._seen.popitem(last=False)
                return self.encode(stack)
            self._graphs[key] = self._record(stack)
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_input, static_output = self._graphs[key]
        static_input.copy_(stack)
        graph.replay()
        return static_output.clone()  # the next replay of any graph may overwrite it (shared pool)
