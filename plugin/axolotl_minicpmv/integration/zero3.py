"""What DeepSpeed ZeRO-3 needs from MiniCPM-V beyond its module hooks (tests/test_zero3_cpu.py trains through it)."""

from __future__ import annotations

import torch


def prepare_for_zero3(model) -> None:
    _register_zero3_external_parameters(model)
    _create_zero3_backward_counters(model)


def _register_zero3_external_parameters(model) -> None:
    """nn.MultiheadAttention reads out_proj's weight and bias without calling out_proj, so ZeRO-3's module
    hooks would leave them partitioned; register them with the attention module that uses them (every
    copy, PEFT's trained resampler included)."""
    import deepspeed

    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            for param in module.out_proj.parameters():
                deepspeed.zero.register_external_parameter(module, param)


def _create_zero3_backward_counters(model) -> None:
    """PEFT's ModulesToSaveWrapper hands unknown attributes on to its trained copy, so when DeepSpeed ZeRO-3
    registers its hooks it finds the copy's backward-hook function on the wrapper and reuses it. The
    wrapper's forward pre-hook then counts pending gradients on the copy before the copy's own pre-hook has
    created the counter: "'Resampler' object has no attribute 'ds_grads_remaining'" in the first step.
    With the counter present from the start, that extra count is harmless (the copy's own pre-hook resets
    it and its own backward hook releases the parameters); tests/test_zero3_cpu.py trains through it."""
    for module in model.modules():
        module.ds_grads_remaining = 0
