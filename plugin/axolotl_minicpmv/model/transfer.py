"""Host-to-GPU copies that do not make the host wait for the GPU's queued work."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)`; to a GPU through pinned memory (the tensor's own if it is pinned) without
    blocking, so that the host does not wait for the GPU's queued work (the vision tower, the previous
    training step) before it goes on launching the next kernels."""
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    return pinned.to(device, non_blocking=True)
