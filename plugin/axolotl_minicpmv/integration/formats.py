"""The training-data formats users already have, turned into the seed form that data.py validates.

Reads (by detection per row, `minicpmv_format: auto`, or by name) the official/seed format, LLaVA/ShareGPT,
messages + images (LLaMA-Factory, ms-swift) and content parts (OpenAI, Axolotl chat-template datasets), and
streams the rows of JSON, JSONL, Parquet and Arrow files, `datasets.save_to_disk` folders, dataset folders and
hub ids (through Axolotl's own loader). Output of `to_seed`: `{"id", "image", "conversations": [{role,
content}]}` where image entries are path strings or encoded image bytes; nothing here decodes pixels.
Tests: tests/test_data_formats.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..model.conversation import IMAGE_TAG, json_type, short_repr
from .args import cfg_value

FORMATS = ("auto", "seed", "llava", "messages", "content_parts")
# Axolotl's chat_template default role names (minus `tool`, which MiniCPM-V has no turn for)
DEFAULT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TARGET_ROLES = ("user", "assistant", "system")
# (messages field, role key, content key, images field) of each named format
FORMAT_FIELDS = {
    "seed": ("conversations", "role", "content", "image"),
    "llava": ("conversations", "from", "value", "image"),
    "messages": ("messages", "role", "content", "images"),
    "content_parts": ("messages", "role", "content", "images"),
}
READ_BATCH = 512  # rows per Arrow batch read from Parquet/Arrow/datasets sources
JSON_CHUNK = 1 << 20  # characters read at a time from a JSON list file
_BASE64 = re.compile(r"[A-Za-z0-9+/\-_=\s]+")  # the standard and the URL-safe alphabets


class BadSample(Exception):
    """Reason one sample is rejected (collected by data.py into InvalidDatasetError)."""


class InvalidDatasetError(ValueError):
    """A dataset source or some of its samples cannot be used; the message names the source and each sample, and why."""


SourceError = InvalidDatasetError  # a source that cannot be read at all (not one sample's fault)


# ---------------------------------------------------------------- per-dataset settings


@dataclass(frozen=True)
class FormatSpec:
    """How to read one dataset entry's rows: the format and the Axolotl-style field mappings."""

    format: str = "auto"
    field_messages: str | None = None
    field_images: str | None = None
    role_key: str | None = None
    content_key: str | None = None
    roles: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))

    def cache_key(self) -> list:
        return [self.format, self.field_messages, self.field_images, self.role_key, self.content_key, sorted(self.roles.items())]


def format_spec(ds_cfg, cfg=None) -> FormatSpec:
    """The FormatSpec of a dataset entry: `minicpmv_format` (entry, then top level; default auto), `field_messages`,
    `field_images`, `message_property_mappings: {role: ..., content: ...}` and `roles: {user: [...], ...}`."""
    where = f"dataset {cfg_value(ds_cfg, 'path')!r}"
    fmt = cfg_value(ds_cfg, "minicpmv_format") or cfg_value(cfg or {}, "minicpmv_format", "auto")
    if fmt not in FORMATS:
        raise ValueError(f"{where}: minicpmv_format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    names = {}
    for key in ("field_messages", "field_images"):
        value = cfg_value(ds_cfg, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: {key} must be a column name (a non-empty string), got {value!r}")
        names[key] = value
    mappings = dict(cfg_value(ds_cfg, "message_property_mappings") or {})
    unknown = sorted(set(mappings) - {"role", "content"})
    if unknown:
        raise ValueError(f"{where}: message_property_mappings maps {unknown}; MiniCPM-V turns have only 'role' and 'content'")
    roles = dict(DEFAULT_ROLES)
    for target, sources in dict(cfg_value(ds_cfg, "roles") or {}).items():
        if target not in TARGET_ROLES:
            raise ValueError(f"{where}: roles maps to {target!r}; the roles are {', '.join(TARGET_ROLES)}")
        for source in [sources] if isinstance(sources, str) else sources:
            roles[source] = target
    return FormatSpec(fmt, names["field_messages"], names["field_images"], mappings.get("role"), mappings.get("content"), roles)


# ---------------------------------------------------------------- one row -> seed form


@dataclass(frozen=True)
class Fields:
    """Which source fields a row's messages and images came from (named in error messages)."""

    messages: str = "conversations"
    images: str = "image"


def to_seed(row, spec: FormatSpec) -> tuple[Any, Fields]:
    """A raw row of any format as a seed sample, plus the source field names for messages.

    Rows that are not objects, or whose messages are not a list, are passed on as they are: data.py's checks
    name what is wrong. Raises BadSample for format-specific problems (a part of unknown type, a remote URL...).
    """
    if not isinstance(row, Mapping):
        return row, Fields()
    defaults = FORMAT_FIELDS.get(spec.format)
    messages_field = spec.field_messages or (defaults[0] if defaults else _first_present(row, ("conversations", "messages")))
    images_field = spec.field_images or (defaults[3] if defaults else _first_present(row, ("image", "images")))
    if images_field is None:  # no images: name the field the row's format would use, in messages
        images_field = "images" if messages_field == "messages" else "image"
    fields = Fields(messages_field or "conversations", images_field)
    seed = {"id": row.get("id")}
    if messages_field is None or messages_field not in row:
        if spec.format == "auto" and not spec.field_messages:
            raise BadSample("has no 'conversations' (nor 'messages'); set field_messages for another column name")
        raise BadSample(f"has no {fields.messages!r}")
    messages = row[messages_field]
    role_key, content_key = spec.role_key, spec.content_key
    if defaults and not (role_key and content_key):
        role_key, content_key = role_key or defaults[1], content_key or defaults[2]
    elif not (role_key and content_key):  # auto: ShareGPT's from/value or role/content, seen on the first turn
        first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], Mapping) else {}
        sharegpt = first.get("from") is not None or first.get("value") is not None
        role_key = role_key or ("from" if sharegpt else "role")
        content_key = content_key or ("value" if sharegpt else "content")
    part_images: list = []
    row_images = row.get(images_field)
    pool = list(row_images) if isinstance(row_images, list) else None  # sources of image parts that carry none
    seed["conversations"] = _messages(messages, fields.messages, role_key, content_key, spec.roles, part_images, pool)
    if part_images:
        if pool:
            raise BadSample(f"{len(pool)} images in {images_field!r} are left over after the image parts without a source took theirs")
        seed["image"] = part_images
    elif row_images is not None:
        seed["image"] = row_images
    return seed, fields


def _first_present(row: Mapping, names: tuple[str, ...]) -> str | None:
    # a null counts as absent: Parquet, Arrow and hub rows carry every column of the table, null where a row has none
    return next((name for name in names if row.get(name) is not None), None)


def _messages(messages, field_name, role_key, content_key, roles, part_images, pool):
    if not isinstance(messages, list):
        return messages  # validate_conversation says what it should be
    out = []
    for i, msg in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, Mapping) or role_key not in msg or content_key not in msg:
            raise BadSample(f"{where} must be an object with {role_key!r} and {content_key!r}, got {short_repr(msg)}")
        role, content = msg[role_key], msg[content_key]
        if isinstance(role, str):
            role = roles.get(role, role)
        if _is_parts(content):
            content = _parts_text(content, where, part_images, pool)
        out.append({"role": role, "content": content})
    return out


def _is_parts(content) -> bool:
    return isinstance(content, list) and bool(content) and all(isinstance(p, Mapping) and "type" in p for p in content)


def _parts_text(parts: list, where: str, part_images: list, pool: list | None) -> str:
    """Content parts as text with an `<image>` tag per image part, parts joined by newlines (as MiniCPM-V's chat
    joins a list of contents); the images are appended to `part_images` in order."""
    texts = []
    for k, part in enumerate(parts):
        here, kind = f"{where}.content[{k}]", part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadSample(f"{here} (text) needs a string 'text', got {short_repr(text)}")
            texts.append(text)
        elif kind in ("image", "image_url"):
            part_images.append(_part_image(part, here, pool))
            texts.append(IMAGE_TAG)
        else:
            raise BadSample(f"{here} has type {short_repr(kind)}; expected 'text', 'image' or 'image_url'")
    return "\n".join(texts)


def _part_image(part: Mapping, where: str, pool: list | None):
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str) or not url:
            raise BadSample(f"{where} (image_url) needs 'image_url': {{'url': ...}}, got {short_repr(part.get('image_url'))}")
        return url
    for key in ("path", "url", "image", "base64"):
        value = part.get(key)
        if value is not None:
            return _strict_base64(value, where) if key == "base64" else value
    if not pool:  # Axolotl's layout: `{"type": "image"}` parts take the row's images in order
        raise BadSample(f"{where} (image) has no 'path', 'url', 'image' or 'base64', and no image is left in the row's images")
    return pool.pop(0)


def _strict_base64(value, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else _raise(TypeError)
    except (binascii.Error, ValueError, TypeError):
        raise BadSample(f"{where}: 'base64' is not valid base64 ({short_repr(value)})") from None


def _raise(exc):
    raise exc


# ---------------------------------------------------------------- image values


def image_value(value, where: str) -> str | bytes:
    """One image as a path string (not resolved yet) or encoded image bytes.

    Takes paths and `file://` URLs, `data:` URLs, base64 strings, raw bytes, `datasets.Image` values (`{"bytes",
    "path"}` dicts; the bytes win when present) and PIL images (their file when they have one, else PNG bytes).
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise BadSample(f"{where} is an empty string")
        if text.startswith("data:"):
            return _data_url(text, where)
        if text.startswith(("http://", "https://")):
            raise BadSample(f"{where} is a remote URL ({short_repr(text)}); download the images and give their paths")
        if text.startswith("file://"):
            return urllib.parse.unquote(urllib.parse.urlparse(text).path)
        if len(text) >= 64 and "." not in text and _BASE64.fullmatch(text):  # a path has an extension, base64 has no '.'
            embedded = _base64_image(text)
            if embedded is not None:
                return embedded
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise BadSample(f"{where} is empty bytes")
        return bytes(value)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return image_value(value["bytes"], where)
        if value.get("path"):
            return image_value(value["path"], where)
        raise BadSample(f"{where} is a {{bytes, path}} image with neither")
    if isinstance(value, Image.Image):
        filename = getattr(value, "filename", "")
        if filename and Path(filename).is_file():
            return filename
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")  # lossless
        return buffer.getvalue()
    raise BadSample(f"{where} must be a path, a data: URL, base64, image bytes or a {{bytes, path}} image, got a JSON {json_type(value)}")


def _base64_image(text: str) -> bytes | None:
    """The image that base64 `text` encodes (standard or URL-safe alphabet, padded or not), or None when it does
    not decode to something Pillow recognises: then it is a path (say, a file named by its hash, without extension)."""
    compact = "".join(text.split()).rstrip("=")
    try:
        data = base64.b64decode(compact.replace("-", "+").replace("_", "/") + "=" * (-len(compact) % 4), validate=True)
        Image.open(io.BytesIO(data))  # reads the header only
    except Exception:
        return None
    return data


def _data_url(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise BadSample(f"{where} is a data: URL without ',' ({short_repr(url)})")
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as err:
        raise BadSample(f"{where}: the data: URL's base64 is invalid ({err})") from None
    if not data:
        raise BadSample(f"{where} is a data: URL with no data")
    return data


# ---------------------------------------------------------------- sources


@dataclass
class Source:
    """A dataset source, read as a stream of rows: `rows()` yields (index, row)."""

    name: str  # for messages: the file, folder or hub id (and split)
    stem: str  # for the prepared file's name
    base_dir: Path | None  # relative image paths resolve here (None: only with minicpmv_image_root)
    fingerprint: list  # what the prepared file's cache key covers
    rows: Any  # () -> Iterator[tuple[int, Any]]


def open_source(ds_cfg) -> Source:
    """The rows of a `datasets:` entry: a JSON / JSONL / Parquet / Arrow file, a folder (save_to_disk or data
    files) or a hub id. Files are read here, in a stream; folders and hub ids go through Axolotl's loader."""
    raw_path = str(cfg_value(ds_cfg, "path"))
    path = Path(raw_path).expanduser()
    if path.is_file():
        path = path.resolve()
        digest = _file_sha256(path)
        suffix = path.suffix.lower()
        readers = {".json": _json_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows, ".arrow": _arrow_rows}
        if suffix not in readers:
            raise SourceError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or .arrow (or a folder)")
        return Source(str(path), path.stem, path.parent, [str(path), digest], lambda: readers[suffix](path))
    split = cfg_value(ds_cfg, "split")
    if path.is_dir():
        path = path.resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts)
        fingerprint = [
            str(path),
            split,
            cfg_value(ds_cfg, "name"),
            cfg_value(ds_cfg, "data_files"),  # which of the folder's files the loader reads
            [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        ]
        name = f"{path} (split {split or 'train'!r})"
        return Source(name, path.name, path, fingerprint, lambda: _datasets_rows(ds_cfg, name))
    if raw_path.startswith((".", "/", "~")) or raw_path.count("/") != 1 or path.suffix.lower() in (".json", ".jsonl", ".parquet", ".arrow"):
        raise SourceError(f"{path.resolve()}: dataset file not found (nor a folder; a hub dataset id reads `owner/name`)")
    revision = cfg_value(ds_cfg, "revision")
    name = f"{raw_path} (hub, split {split or 'train'!r})"
    fingerprint = [raw_path, split, cfg_value(ds_cfg, "name"), cfg_value(ds_cfg, "data_files"), revision, _hub_sha(raw_path, revision)]
    return Source(name, raw_path.replace("/", "_"), None, fingerprint, lambda: _datasets_rows(ds_cfg, name))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_sha(repo: str, revision: str | None) -> str | None:
    """The hub dataset's commit, so a changed dataset is prepared again (None offline: then path+revision decide)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=revision).sha
    except (OSError, ValueError):  # offline, private or missing: the loader reports it
        return None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON list, decoded one at a time from chunks (a 10 GB file never sits in memory)."""
    decoder = json.JSONDecoder()
    with _open_text(path) as handle:
        buf, pos, eof = "", 0, False

        def fill(need_more: bool = False) -> None:
            nonlocal buf, pos, eof
            if eof:
                return
            chunk = _read(handle, path, max(JSON_CHUNK, len(buf) if need_more else 0))
            buf, pos = buf[pos:] + chunk, 0
            eof = not chunk

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos] if pos < len(buf) else ""
                fill()

        if skip_ws() != "[":
            _not_a_list(path, buf[pos:] + _read(handle, path, -1))
        pos += 1
        index = 0
        while True:
            char = skip_ws()
            if char == "]" or (char == "" and index == 0):
                break
            if index:
                if char != ",":
                    raise SourceError(f"{path}: not valid JSON (expected ',' or ']' after the sample at index {index - 1})")
                pos += 1
                skip_ws()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if eof:
                        raise SourceError(f"{path}: not valid JSON (sample at index {index}: {err})") from None
                    fill(need_more=True)
                    continue
                if end == len(buf) and not eof:  # a number or literal may go on in the next chunk
                    fill(need_more=True)
                    continue
                break
            yield index, value
            index, pos = index + 1, end
            if pos > JSON_CHUNK:
                buf, pos = buf[pos:], 0
        if char != "]":
            raise SourceError(f"{path}: not valid JSON (the list is not closed with ']')")
        pos += 1
        if skip_ws():
            raise SourceError(f"{path}: not valid JSON (extra data after the list)")
        if index == 0:
            raise SourceError(f"{path}: the dataset has no samples")


def _not_a_list(path: Path, text: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}: not valid JSON ({err})") from None
    raise SourceError(
        f"{path}: expected a JSON list of samples "
        '[{"id", "image", "conversations": [{"role", "content"}, ...]}, ...] (or a .jsonl file, one sample per line), '
        f"found a JSON {json_type(value)}"
    )


def _open_text(path: Path):
    return path.open("r", encoding="utf-8-sig", newline="")


def _read(handle, path: Path, size: int) -> str:
    try:
        return handle.read(size)
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: not UTF-8 text ({err})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    index = 0
    with _open_text(path) as handle:
        try:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path}: line {line_no} is not valid JSON ({err})") from None
                yield index, value
                index += 1
        except UnicodeDecodeError as err:
            raise SourceError(f"{path}: not UTF-8 text ({err})") from None
    if index == 0:
        raise SourceError(f"{path}: the dataset has no samples")


def _table_rows(batches, path_name: str) -> Iterator[tuple[int, Any]]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1
    if index == 0:
        raise SourceError(f"{path_name}: the dataset has no samples")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
        raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
    yield from _table_rows(handle.iter_batches(batch_size=READ_BATCH), str(path))


def _arrow_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """An Arrow IPC file, in the stream layout `datasets` writes or the file layout."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        try:
            file_reader = pa.ipc.open_file(pa.memory_map(str(path)))
        except pa.ArrowInvalid as err:
            raise SourceError(f"{path}: not a readable Arrow file ({err})") from None
        reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    yield from _table_rows(reader, str(path))


def _datasets_rows(ds_cfg, name: str) -> Iterator[tuple[int, Any]]:
    """Rows of a folder or hub id through Axolotl's loader: save_to_disk folders memory-mapped, data-file folders
    and hub datasets streamed; Arrow formatting keeps `datasets.Image` columns as {bytes, path} (never decoded)."""
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    settings = DictDefault({k: cfg_value(ds_cfg, k) for k in ("path", "split", "name", "data_files", "revision", "trust_remote_code")})
    try:
        dataset = load_dataset_with_config(settings, use_auth_token=False, streaming=True)
    except Exception as err:  # noqa: BLE001 -- datasets raises many types; its message names the problem (split, offline hub...)
        raise SourceError(f"{name}: cannot be loaded as a dataset ({type(err).__name__}: {err})") from None
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict / IterableDatasetDict
        split = settings.split or "train"
        if split not in dataset:
            raise SourceError(f"{name}: no split {split!r} (splits: {', '.join(dataset)}); set `split:`")
        dataset = dataset[split]
    yield from _table_rows(dataset.with_format("arrow").iter(batch_size=READ_BATCH), name)
