"""Recording a function as a CUDA graph, the one way the fast paths do it (`fast_vision`, `fast_decoding`)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def record_cuda_graph(fn: Callable[[], object], warmup_runs: int, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `fn` `warmup_runs` times on a side stream (compilation, cuBLAS workspaces and allocator state settle
    there, outside the graph), then record one more call; returns the graph and that call's output, whose
    tensors the graph's replays overwrite in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_runs):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # "thread_local": only this thread is barred from unsafe CUDA calls while it records. Under the default
    # ("global") another thread's pinned-memory allocation (predict's prefetch thread, a server's request
    # threads) would fail the recording.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph, output
