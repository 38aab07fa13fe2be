"""Which modules get LoRA: the seed's regex by default, a list, or a named preset.

Targets are checked with PEFT's own matching rules against the real module names before PEFT wraps them (a pattern
that matches nothing, or a layer whose wrapper would never run, is a configuration error); what PEFT then wrapped
is logged from the model itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

# The official fine-tuning default (q|k|v of every decoder layer).
DEFAULT_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"

PRESETS = {
    "llm_attn": r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "llm_all_linear": r"llm\..*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
}


def expand_targets(targets: str | list[str] | None) -> str | list[str]:
    """The YAML value -> what PEFT gets: None -> the seed's regex, a preset name -> its regex."""
    if targets is None or targets == [] or targets == "":
        return DEFAULT_TARGETS
    if isinstance(targets, str):
        return PRESETS.get(targets, targets)
    if len(targets) == 1 and targets[0] in PRESETS:
        return PRESETS[targets[0]]
    return list(targets)


class _TargetConfig:
    """The two attributes PEFT's matcher reads."""

    def __init__(self, target_modules):
        self.target_modules = target_modules
        self.layers_to_transform = None
        self.layers_pattern = None


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the linear modules of `model` that PEFT will wrap for `targets`."""
    config = _TargetConfig(targets)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and check_target_module_exists(config, name)]


def check_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The resolved module names; a pattern that matches nothing, or the output projection of an
    `nn.MultiheadAttention` (the resampler's: the attention reads its weight directly, so a LoRA wrapper there would
    never run and never train), is a configuration error."""
    names = resolve_targets(model, targets)
    if not names:
        raise ValueError(
            f"lora_target_modules={targets!r} matches no linear module of MiniCPM-V. A string is a full-match regex over "
            f"module names such as 'llm.model.layers.0.self_attn.q_proj'; presets: {', '.join(PRESETS)}"
        )
    attention = {name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    unused = [name for name in names if name.rpartition(".")[0] in attention]
    if unused:
        raise ValueError(
            f"lora_target_modules={targets!r} matches {', '.join(unused)}: nn.MultiheadAttention reads that weight itself, so "
            "LoRA there would never train. Leave it out of the pattern (the resampler is trained in full by default)."
        )
    return names


def describe_wrapped(model: nn.Module) -> str:
    """How many modules PEFT wrapped with LoRA, per top-level part (llm, vpm, resampler), with an example each."""
    from peft.tuners.lora import LoraLayer

    parts: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            inner = name.split("base_model.model.", 1)[-1]
            parts.setdefault(inner.split(".", 1)[0], []).append(inner)
    return "; ".join(f"{len(found)} modules in {part} (e.g. {found[0]})" for part, found in parts.items()) or "no module"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable), counting each module once: PEFT's frozen originals of fully trained modules are skipped,
    so the numbers compare with the official fine-tuning log."""
    total = trainable = 0
    seen = set()
    for name, param in model.named_parameters():
        if ".original_module." in name or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def merge_modules_to_save(existing: Iterable[str] | None, wanted: Iterable[str]) -> list[str]:
    merged = list(existing or [])
    merged += [m for m in wanted if m not in merged]
    return merged
