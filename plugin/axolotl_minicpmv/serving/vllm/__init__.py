"""vLLM plugin: serves MiniCPM-V 2.0 as the official code computes it (see README.md beside this file).

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts, before it
reads a model's config. It imports nothing from axolotl: only this package's transformers-side classes
(config and tokenizer, registered with the Auto classes on import) and, lazily, vLLM's own model code.
"""

from __future__ import annotations

ARCHITECTURE = "MiniCPMV"  # the official config.json's `architectures`: official folders and our exports serve as they are
MODEL_CLASS = "axolotl_minicpmv.serving.vllm.model:MiniCPMV2ForVLLM"


def register() -> None:
    """Idempotent (vLLM may call it more than once per process)."""
    from vllm import ModelRegistry

    import axolotl_minicpmv  # noqa: F401  # AutoConfig "minicpmv" and AutoTokenizer for the official tokenizer classes

    # A "module:Class" string: vLLM imports the model code only when it builds the model, not in every process.
    # It replaces vLLM's own "MiniCPMV" entry; other MiniCPM-V versions are handed back to vLLM's classes.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
