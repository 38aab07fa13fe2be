"""MiniCPM-V 2.0 for transformers and Axolotl, without remote code.

Importing the package registers the model, config and tokenizer with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained("openbmb/MiniCPM-V-2")` returns our native classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .inference.chat_helper import MiniCPMVChat, img2base64
from .model.configuration_minicpmv import MiniCPMVConfig
from .weights.loading import load_model
from .model.modeling_minicpmv import MiniCPMV
from .model.processing_minicpmv import InvalidInputError, MiniCPMVProcessor
from .model.slicing import slice_image
from .model.tokenization import load_tokenizer

__all__ = [
    "MiniCPMV",
    "MiniCPMVConfig",
    "MiniCPMVChat",
    "MiniCPMVPlugin",
    "MiniCPMVProcessor",
    "InvalidInputError",
    "img2base64",
    "load_model",
    "load_tokenizer",
    "slice_image",
]


def _register_auto_classes() -> None:
    """Registered classes win over a checkpoint's remote-code `auto_map` in transformers >= 5."""
    AutoConfig.register(MiniCPMVConfig.model_type, MiniCPMVConfig, exist_ok=True)
    AutoModel.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)


_register_auto_classes()


def __getattr__(name):
    # The Axolotl plugin imports axolotl, which is heavy: load it only when a config names it.
    if name == "MiniCPMVPlugin":
        from .integration.plugin import MiniCPMVPlugin

        return MiniCPMVPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
