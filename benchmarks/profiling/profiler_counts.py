"""Totals read from a torch.profiler run, and where the host waits for the GPU; shared by the profiling scripts."""

from __future__ import annotations

import collections
import traceback
import warnings
from pathlib import Path

import torch

# The runtime/driver calls that launch one kernel each (eager ops, Triton kernels, cuBLAS/cuDNN).
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def kernel_launches(events) -> int:
    """Kernel launches among `prof.key_averages()`."""
    return sum(e.count for e in events if e.key in LAUNCH_CALLS)


def kernel_ms(events) -> float:
    """GPU kernel time in ms: device events only (an op's self device time repeats its kernels')."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    return sum(e.self_device_time_total for e in kernels) / 1e3


def sync_points(fn) -> dict[str, int]:
    """Run `fn` once under CUDA sync debugging; count, per calling line outside torch, the operations that
    made the host wait for the GPU (each one drains the queue the host had built up ahead of the GPU)."""
    seen: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]
        caller = next((f for f in reversed(frames) if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")), frames[-1])
        seen[f"{Path(caller.filename).name}:{caller.lineno} {caller.name}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return dict(seen.most_common())
