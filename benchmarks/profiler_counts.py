"""Totals read from a torch.profiler run, shared by the profiling scripts."""

from __future__ import annotations

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
