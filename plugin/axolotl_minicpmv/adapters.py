"""Applying exported adapters to a base MiniCPM-V 2.0 model (completed by the export work)."""

from __future__ import annotations

import os
from pathlib import Path


def apply_adapter(model, adapter: str | os.PathLike):
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter directory {str(adapter)!r} does not exist")
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(adapter)!r} has no adapter_config.json: not a PEFT adapter directory")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
