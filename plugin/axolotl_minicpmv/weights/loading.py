"""`load_model`: the one call that loads a base checkpoint, a merged export, or a base plus an adapter."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..model.checkpoint import WEIGHT_FILES, CheckpointError


def load_model(
    model_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = False,
):
    """The one call that loads every export of `minicpmv-export`.

    - `load_model(base)`: the base (hub id or official-layout directory); `load_model(merged_dir)`: a `merged`
      export, which is a complete checkpoint in the same layout.
    - `load_model(base, adapter=dir)`: an `adapter` or `official-lora` export (or an Axolotl output_dir /
      checkpoint-N) applied to `base`. The result is a `peft.PeftModel` with LoRA unmerged, computing exactly
      what the trained model computed; `.chat(...)` works on it. `merge=True` merges in float32 instead and
      returns a plain MiniCPMV in `dtype` (faster to run; equal up to float rounding).
    """
    from ..model.modeling_minicpmv import MiniCPMV

    path = Path(model_path)
    # an Axolotl output_dir holds the adapter and a config.json, but no model weights
    if (path / "adapter_config.json").is_file() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"{str(path)!r} is an adapter, not a model: pass the base model and the adapter, "
            f"e.g. load_model(BASE, adapter={str(path)!r}) or MiniCPMVChat(BASE, adapter={str(path)!r})"
        )
    if adapter is None:
        return MiniCPMV.from_pretrained(str(model_path), dtype=dtype)
    from .adapters import apply_adapter

    model = MiniCPMV.from_pretrained(str(model_path), dtype=torch.float32 if merge else dtype)
    model = apply_adapter(model, adapter, merge=merge)
    return model.to(dtype) if merge and dtype is not None else model
