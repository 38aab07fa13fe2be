"""Fixtures and helpers for the data tests (dataset preparation, prompt strategy, collator).

Test modules import the fixtures by name (`from fixtures_data import ...`); tests/conftest.py
provides `tiny_tokenizer` and the tiny checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
DATASET_TYPE = "axolotl_minicpmv.minicpmv_chat"
PH = "<image>" + "<unk>" * 64 + "</image>"  # one image placeholder


def make_cfg(out_dir: Path, train=(), test=(), **extra):
    """An Axolotl config (DictDefault) with our datasets, as the plugin hooks receive it."""
    from axolotl.utils.dict import DictDefault

    return DictDefault(
        {
            "datasets": [{"path": str(p), "type": DATASET_TYPE} for p in train],
            "test_datasets": [{"path": str(p), "type": DATASET_TYPE, "split": "train"} for p in test],
            "output_dir": str(out_dir),
            "sequence_len": 2048,
            "dataset_num_proc": 1,
            **extra,
        }
    )


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def conv(*turns: str) -> list[dict]:
    """conv("user text", "assistant text", ...): alternating turns starting with the user."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """Real JPEGs in tmp_path/img with sizes that give known layouts at max_slice_nums 9.

    small 200x150 and square 448x448: not sliced; wide 1200x300: 3 cols x 1 row;
    grid 896x896: 2 x 2.
    """
    sizes = {"small": (200, 150), "square": (448, 448), "wide": (1200, 300), "grid": (896, 896)}
    out = {}
    for k, (name, size) in enumerate(sizes.items()):
        path = tmp_path / "img" / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color=(40 * k, 120, 255 - 40 * k)).save(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def prepared_examples(tmp_path_factory):
    """examples/data train.json + eval.json prepared (cfg paths rewritten), once per module."""
    from axolotl_minicpmv.integration.data import prepare_minicpmv_datasets

    cfg = make_cfg(tmp_path_factory.mktemp("examples-out"), train=[EXAMPLES / "train.json"], test=[EXAMPLES / "eval.json"])
    prepare_minicpmv_datasets(cfg)
    return cfg


def load_prepared(ds_cfg):
    """The prepared rows through Axolotl's own loader."""
    from axolotl.utils.data.shared import load_dataset_with_config

    return load_dataset_with_config(ds_cfg, use_auth_token=False)
