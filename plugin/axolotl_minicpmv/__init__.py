"""MiniCPM-V 2.0 for transformers and Axolotl, without remote code.

Importing the package registers the config, model, tokenizer, image processor and processor with
transformers' Auto classes (here, and only here), so `AutoModelForCausalLM.from_pretrained(dir)`,
`AutoTokenizer`, `AutoImageProcessor` and `AutoProcessor` return our native classes for official checkpoints.
"""

import logging

# torchao (pulled in by transformers' quantizers) registers Enum classes with torch's pytree at import, and
# torch logs a deprecation warning for each one on every start: nothing a user of this package can act on.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor  # noqa: E402

from .inference.chat_helper import MiniCPMVChat, img2base64  # noqa: E402
from .integration.predict import predict  # noqa: E402
from .model.configuration_minicpmv import MiniCPMVConfig  # noqa: E402
from .model.conversation import InvalidInputError  # noqa: E402
from .model.image_processing_minicpmv import MiniCPMVImageProcessor  # noqa: E402
from .model.modeling_minicpmv import MiniCPMV  # noqa: E402
from .model.processing_minicpmv import MiniCPMVProcessor  # noqa: E402
from .model.slicing import slice_image  # noqa: E402
from .model.tokenization import load_tokenizer, register_tokenizer  # noqa: E402
from .weights.loading import load_model  # noqa: E402

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
    AutoImageProcessor.register(
        MiniCPMVConfig, image_processor_classes={"pil": MiniCPMVImageProcessor, "torchvision": MiniCPMVImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(MiniCPMVConfig, MiniCPMVProcessor, exist_ok=True)
    register_tokenizer()


_register_auto_classes()


def __getattr__(name):
    # The Axolotl plugin imports axolotl, which is heavy: load it only when a config names it.
    if name == "MiniCPMVPlugin":
        from .integration.plugin import MiniCPMVPlugin

        return MiniCPMVPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
