"""Regional compilation for training: the 40 decoder layers are compiled in place.

Eager, a training step of the seed's recipe is bound by the host launching kernels (thousands of
small ops, LoRA and PEFT wrappers). `Module.compile` on each decoder layer fuses them while leaving
the module tree and its state-dict keys untouched, so PEFT, DeepSpeed's hooks and adapter saving see
the same modules. The layers share one compiled graph (dynamo caches it per code object, and dynamic
shapes serve every sequence length). The vision blocks compiled the same way ran slower than eager,
and so did compiled layers under gradient checkpointing (benchmarks/RESULTS.md), so the vision tower
stays eager (on a GPU it runs packed, model/packed_vision.py; compiling the packed block gained nothing
measurable either) and the plugin warns when checkpointing is on.
"""

from __future__ import annotations

from torch import nn


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place (dynamic shapes); returns how many."""
    from ..model.modeling_minicpmv import MiniCPMDecoderLayer

    layers = [module for module in model.modules() if isinstance(module, MiniCPMDecoderLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
