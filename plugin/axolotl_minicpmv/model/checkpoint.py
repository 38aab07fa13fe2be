"""Strict checks of a MiniCPM-V 2.0 checkpoint folder: complete, and matching its config.

A checkpoint that lacks tensors or has tensors of other shapes is refused with the names, never
silently completed with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
