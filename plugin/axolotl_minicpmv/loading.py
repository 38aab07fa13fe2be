"""Loading MiniCPM-V 2.0 weights strictly: official checkpoints, merged exports and adapters.

A checkpoint that lacks tensors or has tensors of other shapes is refused with the names, never
silently completed with random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as MiniCPM-V 2.0, with what is wrong."""


def is_hub_id(name: str | os.PathLike) -> bool:
    """A name like "openbmb/MiniCPM-V-2" that is not a local path (transformers resolves it on the hub)."""
    text = str(name)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))


def check_checkpoint_dir(path: str | os.PathLike) -> None:
    """Fail early, naming the files, when a local directory is not a complete checkpoint."""
    if is_hub_id(path):
        return
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{str(path)!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            import json

            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{str(path)!r}: {index_name} names shards that are missing: {', '.join(missing)}")


def raise_on_incomplete_load(path, loading_info: dict) -> None:
    problems = []
    if loading_info.get("missing_keys"):
        keys = sorted(loading_info["missing_keys"])
        problems.append(f"{len(keys)} tensors missing (e.g. {', '.join(keys[:5])})")
    if loading_info.get("mismatched_keys"):
        shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in list(loading_info["mismatched_keys"])[:5]]
        problems.append(f"{len(loading_info['mismatched_keys'])} tensors with other shapes ({'; '.join(shown)})")
    if loading_info.get("unexpected_keys"):
        keys = sorted(loading_info["unexpected_keys"])
        problems.append(f"{len(keys)} unexpected tensors (e.g. {', '.join(keys[:5])})")
    if problems:
        raise CheckpointError(f"{path}: not a MiniCPM-V 2.0 checkpoint matching its config.json: " + "; ".join(problems))


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
    from .modeling_minicpmv import MiniCPMV

    path = Path(model_path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
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
