"""MiniCPM-V 2.0 for transformers and Axolotl, without remote code.

Importing the package registers the config, model, tokenizer, image processor and processor with
transformers' Auto classes (here, and only here), so `AutoModelForCausalLM.from_pretrained(dir)`,
`AutoTokenizer`, `AutoImageProcessor` and `AutoProcessor` return our native classes for official checkpoints.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor

from .inference.chat_helper import MiniCPMVChat, img2base64
from .inference.predict import predict
from .model.configuration_minicpmv import MiniCPMVConfig
from .model.conversation import InvalidInputError
from .model.image_processing_minicpmv import MiniCPMVImageProcessor
from .model.modeling_minicpmv import MiniCPMV
from .model.processing_minicpmv import MiniCPMVProcessor
from .model.slicing import slice_image
from .model.tokenization import load_tokenizer, register_tokenizer
from .weights.loading import load_model

__all__ = [
    "MiniCPMV",
    "MiniCPMVConfig",
    "MiniCPMVChat",
    "MiniCPMVImageProcessor",
    "MiniCPMVPlugin",
    "MiniCPMVProcessor",
    "InvalidInputError",
    "img2base64",
    "load_model",
    "load_tokenizer",
    "predict",
    "slice_image",
]


def _register_auto_classes() -> None:
    """Registered classes win over a checkpoint's remote-code `auto_map` in transformers >= 5."""
    AutoConfig.register(MiniCPMVConfig.model_type, MiniCPMVConfig, exist_ok=True)
    AutoModel.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoImageProcessor.register(MiniCPMVConfig, image_processor_classes={"pil": MiniCPMVImageProcessor, "torchvision": MiniCPMVImageProcessor}, exist_ok=True)
    AutoProcessor.register(MiniCPMVConfig, MiniCPMVProcessor, exist_ok=True)
    register_tokenizer()


_register_auto_classes()


def __getattr__(name):
    # The Axolotl plugin imports axolotl, which is heavy: load it only when a config names it.
    if name == "MiniCPMVPlugin":
        from .integration.plugin import MiniCPMVPlugin

        return MiniCPMVPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
