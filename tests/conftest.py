"""Shared fixtures: real tiny checkpoints in the official layout, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline everywhere, as on the machines this runs on.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
REFERENCE = REPO / "tests" / "data" / "minicpm-v-2"  # the official release's config, tokenizer config and weight index


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded random MiniCPM-V 2.0 checkpoint (bf16 shards + index + tokenizer). Do not modify it."""
    from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-minicpmv")


@pytest.fixture(scope="session")
def tiny_checkpoint_fp32(tmp_path_factory) -> Path:
    """The same checkpoint stored in float32, for exact-arithmetic tests."""
    import torch

    from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny32") / "tiny-minicpmv", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from axolotl_minicpmv import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint_fp32):
    """fp32 model in eval mode, shared read-only across tests."""
    import torch

    from axolotl_minicpmv import MiniCPMV

    return MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
