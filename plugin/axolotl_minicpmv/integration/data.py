"""Dataset preparation for `type: axolotl_minicpmv.minicpmv_chat`: validate, resolve, normalise.

Runs before any tokenizer or model is loaded, so that every bad sample is reported up front with its
id (or index) and the reason. Each of our JSON files is rewritten into a Parquet file with one fixed
Arrow schema (Axolotl then loads it with its normal pipeline); the dataset config's `path` is pointed
at it. Tests: tests/test_data_validation.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from axolotl.utils.logging import get_logger

from .args import MiniCPMVArgs, cfg_value
from ..model.conversation import IMAGE_TAG, InvalidInputError, json_type, short_repr, validate_conversation

LOG = get_logger(__name__)

DATASET_TYPE = "axolotl_minicpmv.minicpmv_chat"
# Bump when the prepared rows or the prompt/label layout built from them change: it is part of the
# prepared file's name, which is part of Axolotl's tokenized-dataset cache key.
FORMAT_VERSION = 1
PREPARED_DIR_NAME = "minicpmv_data"
# Axolotl's default output_dir, used when neither dataset_prepared_path nor output_dir is set yet
DEFAULT_OUTPUT_DIR = "./model-out"

# One schema for every row: text-only rows have empty lists, never nulls or a different type.
# (Axolotl's JSON route infers types per 10 MB chunk: a first chunk of text-only rows types
# `image` as list<null> and the first image row then fails, so the prepared file is Parquet.)
PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.list_(pa.string())),
        ("image_sizes", pa.list_(pa.list_(pa.int64()))),
        ("conversations", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)


class InvalidDatasetError(ValueError):
    """A dataset file or some of its samples cannot be used; the message lists each one and why."""


class _BadSample(Exception):
    """Reason one sample is rejected (internal; collected into InvalidDatasetError)."""


@dataclass(frozen=True)
class PreparedDataset:
    source: Path  # the user's JSON file
    path: Path  # the prepared Parquet file the dataset config now points at
    num_samples: int  # samples kept
    num_skipped: int  # bad samples skipped (minicpmv_skip_bad_samples)
    reused: bool  # True when an earlier run's file for the same source and settings was reused


# ---------------------------------------------------------------- config helpers


def row_images(row: dict) -> list:
    """A prepared (or tokenized) row's images in placeholder order: absolute paths, or encoded image bytes."""
    return list(row.get("image") or [])


def is_minicpmv_dataset(ds_cfg) -> bool:
    ds_type = cfg_value(ds_cfg, "type")
    return isinstance(ds_type, str) and ds_type in (DATASET_TYPE, f"{DATASET_TYPE}.load")


def prepared_dir(cfg) -> Path:
    """Where prepared files go: `<dataset_prepared_path or output_dir>/minicpmv_data`."""
    base = cfg_value(cfg, "dataset_prepared_path") or cfg_value(cfg, "output_dir") or DEFAULT_OUTPUT_DIR
    return Path(base) / PREPARED_DIR_NAME


# ---------------------------------------------------------------- entry point for the plugin


def prepare_minicpmv_datasets(cfg) -> list[PreparedDataset]:
    """Validate and normalise every `datasets` / `test_datasets` entry of our type; rewrite its `path`.

    Call it before the tokenizer and the model load (the plugin's `load_datasets` hook, and
    `register` for `axolotl evaluate`). Idempotent: entries already pointing at a prepared file are
    left alone. Raises InvalidDatasetError listing every bad sample, unless `minicpmv_skip_bad_samples`.
    """
    skip_bad = MiniCPMVArgs.from_cfg(cfg).minicpmv_skip_bad_samples
    max_slice_nums = MiniCPMVArgs.from_cfg(cfg).minicpmv_max_slice_nums
    out_dir = prepared_dir(cfg)
    prepared = []
    for key in ("datasets", "test_datasets"):
        for ds_cfg in cfg_value(cfg, key, None) or []:
            if not is_minicpmv_dataset(ds_cfg):
                continue
            path = cfg_value(ds_cfg, "path")
            if not path:
                raise InvalidDatasetError(f"{key}: an entry of type {DATASET_TYPE} has no `path`")
            if _is_prepared_file(Path(path)):
                continue
            result = prepare_dataset_file(path, out_dir, skip_bad_samples=skip_bad, max_slice_nums=max_slice_nums)
            ds_cfg["path"] = str(result.path)
            ds_cfg["ds_type"] = "parquet"
            prepared.append(result)
    return prepared


def _is_prepared_file(path: Path) -> bool:
    return path.suffix == ".parquet" and path.parent.name == PREPARED_DIR_NAME and path.is_file()


# ---------------------------------------------------------------- one file


def prepare_dataset_file(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    skip_bad_samples: bool = False,
    max_slice_nums: int | None = None,
) -> PreparedDataset:
    """Validate `source` (a JSON list, or JSONL) and write `<out_dir>/<stem>-<hash>.parquet`.

    The hash covers the source bytes and path and the settings that change the tokenized result,
    so a re-run with the same inputs reuses the file (and Axolotl's tokenized cache keyed on it).
    """
    source = Path(source).expanduser().resolve()
    if not source.is_file():
        raise InvalidDatasetError(
            f"{source}: dataset file not found (a `{DATASET_TYPE}` dataset must be a local JSON/JSONL file)"
        )
    data = source.read_bytes()
    key = hashlib.sha256()
    key.update(data)
    key.update(json.dumps([FORMAT_VERSION, str(source), skip_bad_samples, max_slice_nums]).encode())
    out_dir = Path(out_dir).expanduser().resolve()
    target = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.parquet"
    meta_path = target.with_suffix(".json")

    if target.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        LOG.info(f"{source}: reusing prepared dataset {target} ({meta['num_samples']} samples)")
        if meta["num_skipped"]:
            LOG.warning(f"{source}: {meta['num_skipped']} bad samples were skipped when it was prepared; see {meta_path}")
        return PreparedDataset(source, target, meta["num_samples"], meta["num_skipped"], reused=True)

    raw_samples = read_samples(source, data)
    rows, bad = normalize_samples(raw_samples, source.parent)
    if bad and not skip_bad_samples:
        raise InvalidDatasetError(_bad_samples_message(source, bad, len(raw_samples)))
    for where, reason in bad:
        LOG.warning(f"{source}: skipping {where}: {reason}")
    if bad:
        LOG.warning(f"{source}: skipped {len(bad)} of {len(raw_samples)} samples (minicpmv_skip_bad_samples: true)")
    if not rows:
        raise InvalidDatasetError(f"{source}: no usable samples left ({len(bad)} bad of {len(raw_samples)})")

    meta = {
        "source": str(source),
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "format_version": FORMAT_VERSION,
        "max_slice_nums": max_slice_nums,
        "num_samples": len(rows),
        "num_skipped": len(bad),
        "skipped": [{"sample": where, "reason": reason} for where, reason in bad],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, lambda f: pq.write_table(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA), f))
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2, ensure_ascii=False).encode()))
    LOG.info(f"{source}: {len(rows)} samples validated and written to {target}")
    return PreparedDataset(source, target, len(rows), len(bad), reused=False)


def _atomic_write(path: Path, write) -> None:
    # several ranks may prepare the same file at once: each writes its own temp file, then renames
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bad_samples_message(source: Path, bad: list[tuple[str, str]], total: int, limit: int = 50) -> str:
    lines = [f"{source}: {len(bad)} of {total} samples are invalid:"]
    lines += [f"  - {where}: {reason}" for where, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    lines.append("Fix them, or set `minicpmv_skip_bad_samples: true` to skip them (each is logged).")
    return "\n".join(lines)


def read_samples(source: Path, data: bytes | None = None) -> list:
    """The samples of a JSON list file (or of a JSONL file, one object per line)."""
    data = source.read_bytes() if data is None else data
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InvalidDatasetError(f"{source}: not UTF-8 text ({err})") from None
    if source.suffix == ".jsonl":
        samples = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InvalidDatasetError(f"{source}: line {line_no} is not valid JSON ({err})") from None
    else:
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidDatasetError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(samples, list):
            raise InvalidDatasetError(
                f"{source}: expected a JSON list of samples "
                '[{"id", "image", "conversations": [{"role", "content"}, ...]}, ...], '
                f"found a JSON {json_type(samples)}"
            )
    if not samples:
        raise InvalidDatasetError(f"{source}: the dataset has no samples")
    return samples


# ---------------------------------------------------------------- samples


def normalize_samples(samples: Iterable, base_dir: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Validate each sample; return (normalised rows, [(which sample, reason), ...] for the bad ones)."""
    rows, bad = [], []
    image_sizes: dict[Path, tuple[int, int]] = {}  # each file's header is read once
    for index, sample in enumerate(samples):
        try:
            rows.append(normalize_sample(sample, index, base_dir, image_sizes))
        except _BadSample as err:
            bad.append((_describe(sample, index), str(err)))
    return rows, bad


def _describe(sample, index: int) -> str:
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    return f"sample {sample_id!r} (index {index})" if sample_id is not None else f"sample at index {index}"


def normalize_sample(sample, index: int, base_dir: Path, size_cache: dict | None = None) -> dict:
    """One sample as a prepared row, or _BadSample with the reason.

    Row: `id` (str; the index when absent), `image` (absolute paths, possibly empty), `image_sizes`
    ([w, h] each), `conversations` where every image has its `<image>` tag (a single untagged image
    gets one in front of the first user turn, followed by a newline, as the official recipe does).
    """
    if not isinstance(sample, dict):
        raise _BadSample(f"is a JSON {json_type(sample)}, expected an object with 'conversations'")
    sample_id = sample.get("id")
    if sample_id is not None and not isinstance(sample_id, (str, int)):
        raise _BadSample(f"'id' must be a string or an integer, got a JSON {json_type(sample_id)}")
    conversations = _check_conversations(sample.get("conversations", _MISSING))
    paths, single = _image_field(sample.get("image"))
    conversations = _check_image_tags(conversations, len(paths), single)
    absolute = [_resolve_image(p, base_dir) for p in paths]
    sizes = [list(_image_size(path, raw, size_cache)) for path, raw in zip(absolute, paths)]
    return {
        "id": str(index if sample_id is None else sample_id),
        "image": [str(p) for p in absolute],
        "image_sizes": sizes,
        "conversations": conversations,
    }


_MISSING = object()


def _check_conversations(conversations) -> list[dict]:
    if conversations is _MISSING:
        raise _BadSample("has no 'conversations'")
    try:
        return validate_conversation(conversations, field="conversations", for_training=True)
    except InvalidInputError as err:
        raise _BadSample(str(err)) from None


def _image_field(image) -> tuple[list[str], bool]:
    """(paths, given as a single string)."""
    if image is None:
        return [], False
    if isinstance(image, str):
        if not image.strip():
            raise _BadSample("'image' is an empty string")
        return [image], True
    if isinstance(image, list):
        for k, path in enumerate(image):
            if not isinstance(path, str) or not path.strip():
                raise _BadSample(f"image[{k}] must be a non-empty path string, got {short_repr(path)}")
        return list(image), False
    raise _BadSample(f"'image' must be a path or a list of paths, got a JSON {json_type(image)}")


def _check_image_tags(conversations: list[dict], num_images: int, single: bool) -> list[dict]:
    tags = 0
    for i, msg in enumerate(conversations):
        count = msg["content"].count(IMAGE_TAG)
        if count and msg["role"] != "user":
            raise _BadSample(f"conversations[{i}] (assistant) contains {IMAGE_TAG!r}; images go in user turns")
        tags += count
    if tags == num_images:
        return conversations
    if single and tags == 0:
        first = conversations[0]
        return [{"role": "user", "content": IMAGE_TAG + "\n" + first["content"]}] + conversations[1:]
    if num_images == 0:
        raise _BadSample(f"{tags} {IMAGE_TAG!r} tag(s) but the sample has no 'image'")
    if tags > num_images:
        raise _BadSample(f"more {IMAGE_TAG!r} tags ({tags}) than images ({num_images})")
    raise _BadSample(
        f"fewer {IMAGE_TAG!r} tags ({tags}) than images ({num_images}); "
        "with a list of images each image needs its own tag, in order"
    )


def _resolve_image(raw: str, base_dir: Path) -> Path:
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    if not path.is_file():
        raise _BadSample(f"image {raw!r} not found (looked for {path})")
    return path


def _image_size(path: Path, raw: str, cache: dict | None) -> tuple[int, int]:
    if cache is not None and path in cache:
        return cache[path]
    try:
        with Image.open(path) as image:  # reads the header only
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _BadSample(f"image {raw!r} cannot be read as an image ({path}: {err})") from None
    if size[0] < 1 or size[1] < 1:
        raise _BadSample(f"image {raw!r} is empty (size {size[0]}x{size[1]})")
    if cache is not None:
        cache[path] = size
    return size
