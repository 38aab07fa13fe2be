"""Dataset preparation for `type: axolotl_minicpmv.minicpmv_chat`: validate, resolve, normalise.

Runs before any tokenizer or model is loaded, so that every bad sample is reported up front with its
id (or index) and the reason. formats.py reads each source (JSON, JSONL, Parquet, Arrow, folders, hub ids)
as a stream and turns its rows, whatever their format, into seed samples; this module validates them and
writes one Parquet file with one fixed Arrow schema, batch by batch (Axolotl then loads it with its normal
pipeline); the dataset config's `path` is pointed at it. Tests: tests/test_data_validation.py,
tests/test_data_formats.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from axolotl.utils.logging import get_logger
from PIL import Image

from ..model.conversation import IMAGE_TAG, InvalidInputError, json_type, short_repr, validate_conversation
from .args import MiniCPMVArgs, cfg_value
from .formats import BadSample, Fields, FormatSpec, InvalidDatasetError, format_spec, image_value, open_source, to_seed

LOG = get_logger(__name__)

DATASET_TYPE = "axolotl_minicpmv.minicpmv_chat"
# Bump when the prepared rows or the prompt/label layout built from them change: it is part of the
# prepared file's name, which is part of Axolotl's tokenized-dataset cache key.
FORMAT_VERSION = 3  # 2: image_bytes column (embedded images kept as bytes); 3: <image> only in user turns
PREPARED_DIR_NAME = "minicpmv_data"
# Axolotl's default output_dir, used when neither dataset_prepared_path nor output_dir is set yet
DEFAULT_OUTPUT_DIR = "./model-out"
# Rows are written in batches: memory is bounded by a batch, not by the dataset
WRITE_BATCH_ROWS = 1000
WRITE_BATCH_BYTES = 64 << 20

# One schema for every row: text-only rows have empty lists, never nulls or a different type.
# (Axolotl's JSON route infers types per 10 MB chunk: a first chunk of text-only rows types
# `image` as list<null> and the first image row then fails, so the prepared file is Parquet.)
# `image` and `image_bytes` run in parallel: a file image has its absolute path and b"", an embedded
# one "" and its encoded bytes (decoded only in the collator); `row_images` reads them.
PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.list_(pa.string())),
        ("image_bytes", pa.list_(pa.binary())),
        ("image_sizes", pa.list_(pa.list_(pa.int64()))),
        ("conversations", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)

__all__ = [
    "BadSample",
    "InvalidDatasetError",
    "describe_sample",
    "PreparedDataset",
    "normalize_sample",
    "prepare_dataset_file",
    "prepare_minicpmv_datasets",
    "row_images",
]


@dataclass(frozen=True)
class PreparedDataset:
    source: Path | str  # the user's file or folder (or hub id)
    path: Path  # the prepared Parquet file the dataset config now points at
    num_samples: int  # samples kept
    num_skipped: int  # bad samples skipped (minicpmv_skip_bad_samples)
    reused: bool  # True when an earlier run's file for the same source and settings was reused


def row_images(row) -> list[str | bytes]:
    """A prepared (or tokenized) row's images in placeholder order: absolute paths or encoded image bytes."""
    paths = row.get("image") or []
    blobs = row.get("image_bytes") or [None] * len(paths)
    return [blob if blob else path for path, blob in zip(paths, blobs)]


# ---------------------------------------------------------------- config helpers


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

    Call it before the tokenizer and the model load (the plugin's `register`, with the raw YAML: the
    per-dataset keys it reads, such as `minicpmv_format` and `field_images`, are not in Axolotl's dataset
    schema). Idempotent: entries already pointing at a prepared file are left alone. Raises
    InvalidDatasetError listing every bad sample, unless `minicpmv_skip_bad_samples`.
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
            result = prepare_dataset_file(
                ds_cfg,
                out_dir,
                skip_bad_samples=skip_bad,
                max_slice_nums=max_slice_nums,
                spec=format_spec(ds_cfg, cfg),
                image_root=cfg_value(ds_cfg, "minicpmv_image_root") or cfg_value(cfg, "minicpmv_image_root"),
            )
            if not Path(str(path)).expanduser().is_file():
                # a folder's or hub id's split / config name / data files were read here; the prepared file has
                # one "train" split, and Axolotl would pass `name` on to the Parquet loader
                for key_ in ("name", "data_files"):
                    if cfg_value(ds_cfg, key_) is not None:
                        ds_cfg[key_] = None
                if cfg_value(ds_cfg, "split"):
                    ds_cfg["split"] = "train"
            ds_cfg["path"] = str(result.path)
            ds_cfg["ds_type"] = "parquet"
            prepared.append(result)
    return prepared


def _is_prepared_file(path: Path) -> bool:
    return path.suffix == ".parquet" and path.parent.name == PREPARED_DIR_NAME and path.is_file()


# ---------------------------------------------------------------- one source


def prepare_dataset_file(
    source,
    out_dir: str | os.PathLike,
    *,
    skip_bad_samples: bool = False,
    max_slice_nums: int | None = None,
    spec: FormatSpec | None = None,
    image_root: str | os.PathLike | None = None,
) -> PreparedDataset:
    """Validate `source` (a path, or a dataset config entry with `path`/`split`/`name`) and write
    `<out_dir>/<stem>-<hash>.parquet`, streaming: rows are read, checked and written batch by batch.

    The hash covers the source (file bytes, or a folder's file list, sizes and times, or a hub id and
    revision) and the settings that change the tokenized result, so a re-run with the same inputs reuses
    the file (and Axolotl's tokenized cache keyed on it).
    """
    ds_cfg = source if isinstance(source, Mapping) else {"path": str(source)}
    spec = spec or format_spec(ds_cfg)
    src = open_source(ds_cfg)
    root = Path(image_root).expanduser().resolve() if image_root else None
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, src.fingerprint, skip_bad_samples, max_slice_nums, spec.cache_key(), str(root)]).encode()
    )
    out_dir = Path(out_dir).expanduser().resolve()
    target = out_dir / f"{src.stem}-{key.hexdigest()[:16]}.parquet"
    meta_path = target.with_suffix(".json")

    if target.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        LOG.info(f"{src.name}: reusing prepared dataset {target} ({meta['num_samples']} samples)")
        if meta["num_skipped"]:
            LOG.warning(
                f"{src.name}: {meta['num_skipped']} bad samples were skipped when it was prepared (reasons in {meta_path}); "
                f"the file is reused as it is: after fixing them (their images, say), delete {target} to prepare it again"
            )
        return PreparedDataset(src.name, target, meta["num_samples"], meta["num_skipped"], reused=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        total, kept, bad = _write_rows(src, spec, root, tmp, keep_writing=lambda bad: skip_bad_samples or not bad)
        if bad and not skip_bad_samples:
            raise InvalidDatasetError(_bad_samples_message(src.name, bad, total))
        for where, reason in bad:
            LOG.warning(f"{src.name}: skipping {where}: {reason}")
        if bad:
            LOG.warning(f"{src.name}: skipped {len(bad)} of {total} samples (minicpmv_skip_bad_samples: true)")
        if not kept:
            raise InvalidDatasetError(f"{src.name}: no usable samples left ({len(bad)} bad of {total})")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    seconds = time.perf_counter() - start
    meta = {
        "source": src.name,
        "source_fingerprint": src.fingerprint,
        "format": spec.format,
        "format_version": FORMAT_VERSION,
        "max_slice_nums": max_slice_nums,
        "num_samples": kept,
        "num_skipped": len(bad),
        "seconds": round(seconds, 3),
        "skipped": [{"sample": where, "reason": reason} for where, reason in bad],
    }
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2, ensure_ascii=False).encode()))
    LOG.info(
        f"{src.name}: {kept} samples validated and written to {target} "
        f"({total} read in {seconds:.1f} s: {total / max(seconds, 1e-9):.0f} samples/s)"
    )
    return PreparedDataset(src.name, target, kept, len(bad), reused=False)


def _write_rows(src, spec: FormatSpec, root: Path | None, tmp: str, keep_writing) -> tuple[int, int, list[tuple[str, str]]]:
    """Stream the source's rows through to_seed + normalize_sample into the Parquet file `tmp`.

    Returns (rows read, rows written, bad samples). Once a bad sample is found in strict mode nothing more is
    written (the file is discarded), but every row is still checked, so that all bad samples are listed.
    """
    total = kept = 0
    bad: list[tuple[str, str]] = []
    sizes: dict = {}  # each image file's header is read once
    batch: list[dict] = []
    batch_bytes = 0
    with pq.ParquetWriter(tmp, PREPARED_SCHEMA) as writer:
        for index, raw in src.rows():
            total += 1
            try:
                seed, fields = to_seed(raw, spec)
                row = normalize_sample(seed, index, src.base_dir, sizes, fields=fields, image_root=root)
            except BadSample as err:
                bad.append((describe_sample(raw, index), str(err)))
                continue
            if not keep_writing(bad):
                continue
            batch.append(row)
            batch_bytes += sum(len(b) for b in row["image_bytes"])
            if len(batch) >= WRITE_BATCH_ROWS or batch_bytes >= WRITE_BATCH_BYTES:
                writer.write_table(pa.Table.from_pylist(batch, schema=PREPARED_SCHEMA))
                kept += len(batch)
                batch, batch_bytes = [], 0
        if batch and keep_writing(bad):
            writer.write_table(pa.Table.from_pylist(batch, schema=PREPARED_SCHEMA))
            kept += len(batch)
    return total, kept, bad


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


def _bad_samples_message(source, bad: list[tuple[str, str]], total: int, limit: int = 50) -> str:
    lines = [f"{source}: {len(bad)} of {total} samples are invalid:"]
    lines += [f"  - {where}: {reason}" for where, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    lines.append("Fix them, or set `minicpmv_skip_bad_samples: true` to skip them (each is logged).")
    return "\n".join(lines)


def read_samples(source: Path) -> list:
    """All samples of a JSON list / JSONL / Parquet / Arrow file as a list (small files and tests only)."""
    return [row for _, row in open_source({"path": str(source)}).rows()]


# ---------------------------------------------------------------- samples


def normalize_samples(samples: Iterable, base_dir: Path, spec: FormatSpec | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Validate each sample (of any format); return (normalised rows, [(which sample, reason), ...] for the bad ones)."""
    spec = spec or FormatSpec()
    rows, bad = [], []
    image_sizes: dict = {}  # each file's header is read once
    for index, sample in enumerate(samples):
        try:
            seed, fields = to_seed(sample, spec)
            rows.append(normalize_sample(seed, index, base_dir, image_sizes, fields=fields))
        except BadSample as err:
            bad.append((describe_sample(sample, index), str(err)))
    return rows, bad


def describe_sample(sample, index: int) -> str:
    sample_id = sample.get("id") if isinstance(sample, Mapping) else None
    return f"sample {sample_id!r} (index {index})" if sample_id is not None else f"sample at index {index}"


def normalize_sample(
    sample,
    index: int,
    base_dir: Path | None,
    size_cache: dict | None = None,
    *,
    fields: Fields | None = None,
    image_root: Path | None = None,
) -> dict:
    """One seed sample as a prepared row, or BadSample with the reason.

    Row: `id` (str; the index when absent), `image` (absolute paths; "" for an embedded image),
    `image_bytes` (the embedded images' encoded bytes; b"" for a file), `image_sizes` ([w, h] each),
    `conversations` where every image has its `<image>` tag (a single untagged image gets one in front of
    the first user turn, followed by a newline, as the official recipe does). Relative image paths resolve
    against `image_root` when given, else against `base_dir` (the data file's folder). `fields` names the
    source's fields in the messages.
    """
    fields = fields or Fields()
    if not isinstance(sample, Mapping):
        raise BadSample(f"is a JSON {json_type(sample)}, expected an object with 'conversations'")
    sample_id = sample.get("id")
    if sample_id is not None and not isinstance(sample_id, (str, int)):
        raise BadSample(f"'id' must be a string or an integer, got a JSON {json_type(sample_id)}")
    turns = sample.get("conversations", _MISSING)
    conversations = _check_conversations(turns, fields.messages)
    _check_tags_in_user_turns(turns, fields)
    entries, single = _image_field(sample.get("image"), fields.images)
    conversations = _check_image_tags(conversations, len(entries), single, fields)
    paths, blobs, sizes = [], [], []
    for k, entry in enumerate(entries):
        what = repr(fields.images) if single else f"{fields.images}[{k}]"
        if isinstance(entry, bytes):
            paths.append("")
            blobs.append(entry)
            sizes.append(list(_bytes_size(entry, what)))
        else:
            path = _resolve_cached(entry, image_root or base_dir, size_cache)
            paths.append(str(path))
            blobs.append(b"")
            sizes.append(list(_image_size(path, entry, size_cache)))
    return {
        "id": str(index if sample_id is None else sample_id),
        "image": paths,
        "image_bytes": blobs,
        "image_sizes": sizes,
        "conversations": conversations,
    }


_MISSING = object()


def _check_conversations(conversations, field: str = "conversations") -> list[dict]:
    if conversations is _MISSING:
        raise BadSample(f"has no {field!r}")
    try:
        return validate_conversation(conversations, field=field, for_training=True)
    except InvalidInputError as err:
        raise BadSample(str(err)) from None


def _image_field(image, field: str = "image") -> tuple[list[str | bytes], bool]:
    """(entries: path strings or encoded bytes, given as a single value rather than a list)."""
    if image is None:
        return [], False
    if isinstance(image, list):
        return [image_value(entry, f"{field}[{k}]") for k, entry in enumerate(image)], False
    if isinstance(image, (str, bytes, bytearray, Mapping, Image.Image)):
        return [image_value(image, repr(field))], True
    raise BadSample(f"{field!r} must be a path or a list of paths, got a JSON {json_type(image)}")


def _check_tags_in_user_turns(turns: list[dict], fields: Fields) -> None:
    """Pictures go in user turns only; checked on the turns as given (before system turns are folded into the first
    user turn), so the message names the turn's own index and role."""
    for i, msg in enumerate(turns):
        if msg["role"] != "user" and IMAGE_TAG in msg["content"]:
            raise BadSample(f"{fields.messages}[{i}] ({msg['role']}) contains {IMAGE_TAG!r}; images go in user turns")


def _check_image_tags(conversations: list[dict], num_images: int, single: bool, fields: Fields) -> list[dict]:
    tags = sum(msg["content"].count(IMAGE_TAG) for msg in conversations)
    if tags == num_images:
        return conversations
    if single and tags == 0:
        first = conversations[0]
        return [{"role": "user", "content": IMAGE_TAG + "\n" + first["content"]}] + conversations[1:]
    if num_images == 0:
        raise BadSample(f"{tags} {IMAGE_TAG!r} tag(s) but the sample has no {fields.images!r}")
    if tags > num_images:
        raise BadSample(f"more {IMAGE_TAG!r} tags ({tags}) than images ({num_images})")
    raise BadSample(
        f"fewer {IMAGE_TAG!r} tags ({tags}) than images ({num_images}); with a list of images each image needs its own tag, in order"
    )


def _resolve_image(raw: str, base_dir: Path | None) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        if base_dir is None:
            raise BadSample(f"image {raw!r} is a relative path and the dataset has no folder to resolve it in; set minicpmv_image_root")
        path = base_dir / path
    try:
        path = path.resolve()
        found = path.is_file()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte...
        raise BadSample(f"image {short_repr(raw)} is neither a usable path nor base64 of an image ({err})") from None
    if not found:
        raise BadSample(f"image {raw!r} not found (looked for {path})")
    return path


def _resolve_cached(raw: str, base_dir: Path | None, cache: dict | None) -> Path:
    # 100,000 samples often share 10,000 files: resolve (and stat) each (folder, name) once
    if cache is None:
        return _resolve_image(raw, base_dir)
    key = (raw, base_dir)
    if key not in cache:
        cache[key] = _resolve_image(raw, base_dir)
    return cache[key]


def _image_size(path: Path, raw: str, cache: dict | None) -> tuple[int, int]:
    if cache is not None and path in cache:
        return cache[path]
    size = _header_size(path, f"image {raw!r}", f"{path}: ")
    if cache is not None:
        cache[path] = size
    return size


def _bytes_size(data: bytes, what: str) -> tuple[int, int]:
    return _header_size(io.BytesIO(data), f"{what} (embedded, {len(data)} bytes)", "")


def _header_size(source, what: str, prefix: str) -> tuple[int, int]:
    try:
        with Image.open(source) as image:  # reads the header only
            size = image.size
            image.verify()
    except Exception as err:  # Pillow's format plugins fail with many types (OSError, SyntaxError, IndexError...)
        raise BadSample(f"{what} cannot be read as an image ({prefix}{err})") from None
    if size[0] < 1 or size[1] < 1:
        raise BadSample(f"{what} is empty (size {size[0]}x{size[1]})")
    return size
