"""Data formats users already have (LLaVA/ShareGPT, messages + images, content parts, datasets with embedded
images) and sources (JSON, JSONL, Parquet, save_to_disk, dataset folders read like hub ids): the same
conversations give the same training rows in every format; each format's mistakes are named by sample and reason."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from axolotl.utils.dict import DictDefault
from fixtures_data import (  # noqa: F401
    DATASET_TYPE,
    EXAMPLES,
    conv,
    images,
    load_prepared,
    make_cfg,
    write_json,
)

from axolotl_minicpmv.integration import formats
from axolotl_minicpmv.integration.collator import MiniCPMVDataCollator
from axolotl_minicpmv.integration.data import (
    InvalidDatasetError,
    prepare_dataset_file,
    prepare_minicpmv_datasets,
    row_images,
)
from axolotl_minicpmv.integration.prompt_strategy import MiniCPMVChatStrategy

SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
PART = {"type": datasets.Value("string"), "text": datasets.Value("string")}


def canonical(images) -> list[dict]:
    """The conversations every format below writes: tags explicit, image names from the `images` fixture."""
    return [
        {"id": "one", "images": ["small"], "turns": conv("<image>\nWhat is in the image?", "A cat.", "And its colour?", "Blue.")},
        {"id": "untagged", "images": ["square"], "turns": conv("<image>\nDescribe it.", "A square.")},
        {"id": "two", "images": ["wide", "grid"], "turns": conv("<image>\nFirst?", "Wide.", "<image>\nSecond?", "Grid.")},
        {"id": "text", "images": [], "turns": [{"role": "system", "content": "Be brief."}] + conv("Hi", "Hello.")},
    ]


def to_parts(content: str) -> list[dict]:
    out = []
    for i, piece in enumerate(content.split("<image>")):
        if i:
            out.append({"type": "image", "text": None})
            piece = piece.removeprefix("\n")
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def write_all_formats(folder: Path, images) -> dict[str, dict]:
    """The canonical samples in every format and source kind; returns {name: dataset config entry}."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = {name: str(path.relative_to(folder.parent)) for name, path in images.items()}  # images live in tmp_path/img
    samples = canonical(images)
    raw = {name: path.read_bytes() for name, path in images.items()}
    entries = {}

    seed = []
    for s in samples:
        row = {"id": s["id"], "conversations": [dict(t) for t in s["turns"]]}
        if s["id"] == "untagged":
            row["conversations"][0]["content"] = "Describe it."  # the seed format adds "<image>\n" itself
        if s["images"]:
            row["image"] = "../" + rel[s["images"][0]] if len(s["images"]) == 1 else ["../" + rel[n] for n in s["images"]]
        seed.append(row)
    entries["seed"] = {"path": str(write_json(folder / "seed.json", seed))}

    llava = [
        {
            "id": r["id"],
            "conversations": [{"from": SHAREGPT[t["role"]], "value": t["content"]} for t in s["turns"]],
            **({"image": r["image"]} if "image" in r else {}),
        }
        for r, s in zip(seed, samples)
    ]
    entries["llava"] = {"path": str(write_json(folder / "llava.json", llava)), "minicpmv_format": "llava"}

    (folder / "messages.jsonl").write_text(
        "\n".join(json.dumps({"id": s["id"], "messages": s["turns"], "images": [str(images[n]) for n in s["images"]]}) for s in samples)
    )
    entries["messages"] = {"path": str(folder / "messages.jsonl")}

    # content parts whose image parts carry their own source, one kind of source each
    sources = iter(
        [
            {"type": "image", "path": "../" + rel["small"]},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(raw["square"]).decode()}},
            {"type": "image", "base64": base64.b64encode(raw["wide"]).decode()},
            {"type": "image", "url": images["grid"].as_uri()},
        ]
    )
    rows = []
    for s in samples:
        messages = []
        for t in s["turns"]:
            content = [next(sources) if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in to_parts(t["content"])]
            messages.append({"role": t["role"], "content": content if t["role"] == "user" else t["content"]})
        rows.append({"id": s["id"], "messages": messages})
    (folder / "parts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    entries["content_parts"] = {"path": str(folder / "parts.jsonl")}

    # Axolotl's layout in Parquet: sourceless image parts take the embedded `images` column in order
    features = datasets.Features(
        id=datasets.Value("string"),
        messages=datasets.List({"role": datasets.Value("string"), "content": datasets.List(PART)}),
        images=datasets.List(datasets.Image()),
    )
    rows = [
        {
            "id": s["id"],
            "messages": [{"role": t["role"], "content": to_parts(t["content"])} for t in s["turns"]],
            "images": [{"bytes": raw[n], "path": f"{n}.jpg"} for n in s["images"]],
        }
        for s in samples
    ]
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "parts_bytes.parquet"))
    entries["parquet_bytes"] = {"path": str(folder / "parts_bytes.parquet")}

    # ShareGPT + embedded images: a save_to_disk folder, and a folder of Parquet files read like a hub id
    features = datasets.Features(
        id=datasets.Value("string"),
        conversations=datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        images=datasets.List(datasets.Image()),
    )
    rows = [
        {"id": r["id"], "conversations": r["conversations"], "images": [{"bytes": raw[n], "path": None} for n in s["images"]]}
        for r, s in zip(llava, samples)
    ]
    sharegpt = datasets.Dataset.from_list(rows, features=features)
    sharegpt.save_to_disk(str(folder / "saved"))
    entries["save_to_disk"] = {"path": str(folder / "saved")}
    sharegpt.to_parquet(str(folder / "hub" / "data" / "train-00000-of-00001.parquet"))
    entries["dataset_folder"] = {"path": str(folder / "hub"), "split": "train"}

    # other names, mapped Axolotl-style
    custom = [
        {
            "uid": s["id"],
            "dialog": [
                {"speaker": {"system": "sys", "user": "customer", "assistant": "agent"}[t["role"]], "text": t["content"]}
                for t in s["turns"]
            ],
            "pictures": [str(images[n]) for n in s["images"]],
        }
        for s in samples
    ]
    for row, s in zip(custom, samples):
        row["id"] = s["id"]
    entries["mapped"] = {
        "path": str(write_json(folder / "custom.json", custom)),
        "field_messages": "dialog",
        "field_images": "pictures",
        "message_property_mappings": {"role": "speaker", "content": "text"},
        "roles": {"user": ["customer"], "assistant": ["agent"], "system": ["sys"]},
    }
    return {name: {"type": DATASET_TYPE, **entry} for name, entry in entries.items()}


def test_the_same_conversations_in_every_format_give_identical_training_rows(tmp_path, images, tiny_tokenizer):
    entries = write_all_formats(tmp_path / "data", images)
    cfg = make_cfg(tmp_path / "run")
    cfg.datasets = [DictDefault(e) for e in entries.values()]
    prepare_minicpmv_datasets(cfg)
    strategy = MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=8192)
    collator = MiniCPMVDataCollator(tiny_tokenizer)
    tokenized = {}
    for name, ds_cfg in zip(entries, cfg.datasets):
        rows = list(load_prepared(ds_cfg))
        assert [r["id"] for r in rows] == ["one", "untagged", "two", "text"], name
        tokenized[name] = {r["id"]: strategy.tokenize_prompt(r) for r in rows}
    # the embedded formats really kept bytes (and the path formats paths) in the prepared rows
    kinds = {name: {type(x) for r in load_prepared(ds_cfg) for x in row_images(r)} for name, ds_cfg in zip(entries, cfg.datasets)}
    assert kinds["seed"] == kinds["llava"] == kinds["messages"] == kinds["mapped"] == {str}
    assert kinds["parquet_bytes"] == kinds["save_to_disk"] == kinds["dataset_folder"] == {bytes}
    assert kinds["content_parts"] == {bytes, str}  # paths and file:// URLs stay paths; data: URLs and base64 become bytes

    reference = tokenized["seed"]
    assert reference["two"]["image_sizes"] == [[1200, 300], [896, 896]]
    for name, rows in tokenized.items():
        for sample_id, row in rows.items():
            ref = reference[sample_id]
            assert row["input_ids"] == ref["input_ids"], (name, sample_id)
            assert row["labels"] == ref["labels"], (name, sample_id)
            assert row["image_sizes"] == ref["image_sizes"], (name, sample_id)
        # and the collator's pixels (decoded from paths or from the embedded bytes) are the same too
        batch, ref_batch = collator([rows["two"], rows["one"]]), collator([reference["two"], reference["one"]])
        assert len(batch["pixel_values"]) == len(ref_batch["pixel_values"])
        for got, want in zip(batch["pixel_values"], ref_batch["pixel_values"]):
            assert torch.equal(got, want), name


def test_auto_detection_reads_a_file_that_mixes_formats(tmp_path, images):
    rows = [
        {"id": "seed", "image": str(images["small"]), "conversations": conv("q", "a")},
        {
            "id": "llava",
            "image": str(images["small"]),
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        {"id": "messages", "images": [str(images["small"])], "messages": conv("<image>\nq", "a")},
        {
            "id": "parts",
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": str(images["small"])}, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            ],
        },
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    result = prepare_dataset_file(source, tmp_path / "out")
    prepared = pq.read_table(result.path).to_pylist()
    assert {r["id"]: r["conversations"][0]["content"] for r in prepared} == {
        k: "<image>\nq" for k in ("seed", "llava", "messages", "parts")
    }


def test_auto_detection_reads_mixed_formats_from_parquet_whose_rows_carry_every_column(tmp_path, images):
    """A table has every column in every row (null where a row has none, and every key in each turn's struct):
    a null column or key is absent, as it is in JSON."""
    rows = [
        {"id": "seed", "image": str(images["small"]), "conversations": conv("<image>\nq", "a")},
        {
            "id": "llava",
            "image": str(images["small"]),
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        {"id": "messages", "images": [str(images["small"])], "messages": conv("<image>\nq", "a")},
    ]
    source = tmp_path / "mixed.parquet"
    columns = sorted({key for row in rows for key in row})
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), source)
    first = pq.read_table(source).to_pylist()[0]
    assert first["messages"] is None and first["conversations"][0]["from"] is None  # nulls, not missing keys
    prepared = pq.read_table(prepare_dataset_file(source, tmp_path / "out").path).to_pylist()
    assert {r["id"]: r["conversations"] for r in prepared} == {k: conv("<image>\nq", "a") for k in ("seed", "llava", "messages")}


def test_base64_images_in_either_alphabet_and_hash_named_files(tmp_path, images):
    """Unpadded and URL-safe base64 are embedded images; a file named by a hash, without extension (base64-like),
    is read as the file it is."""
    png = images["small"].read_bytes()
    hashed = images["small"].parent / ("0f" * 32)
    hashed.write_bytes(png)
    rows = [
        {"id": "unpadded", "image": base64.b64encode(png).decode().rstrip("="), "conversations": conv("q", "a")},
        {"id": "urlsafe", "image": base64.urlsafe_b64encode(png).decode(), "conversations": conv("q", "a")},
        {"id": "hashed", "image": f"img/{hashed.name}", "conversations": conv("q", "a")},
    ]
    prepared = {
        r["id"]: r for r in pq.read_table(prepare_dataset_file(write_json(tmp_path / "d.json", rows), tmp_path / "out").path).to_pylist()
    }
    assert prepared["unpadded"]["image_bytes"] == [png] and prepared["urlsafe"]["image_bytes"] == [png]
    assert prepared["hashed"]["image"] == [str(hashed.resolve())] and prepared["hashed"]["image_bytes"] == [b""]


def test_a_folders_data_files_are_part_of_its_cache_key(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": f"{name}{k}", "conversations": conv("q", name)}) + "\n" for k in range(2))
        )
    ids = {}
    for name in ("a", "b"):
        result = prepare_dataset_file({"path": str(folder), "data_files": [str(folder / f"{name}.jsonl")]}, tmp_path / "out")
        ids[name] = (result.reused, [r["id"] for r in pq.read_table(result.path).to_pylist()])
    assert ids == {"a": (False, ["a0", "a1"]), "b": (False, ["b0", "b1"])}


# (format, row, expected reason): each bad row sits at index 1 of a JSONL file, after a good seed row
BAD_ROWS = {
    "llava turn without value": (
        None,
        {"id": "bad-1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
        "conversations[1] must be an object with 'from' and 'value', got {'from': 'gpt'}",
    ),
    "llava unknown role": (
        None,
        {"id": "bad-1", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        "conversations[1] has unknown role 'bot'",
    ),
    "llava image missing": (
        "llava",
        {"id": "bad-1", "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        "image 'nope.jpg' not found",
    ),
    "messages image missing": (
        None,
        {"id": "bad-1", "images": ["nope.jpg"], "messages": conv("<image>q", "a")},
        "image 'nope.jpg' not found",
    ),
    "messages tag without image": (
        "messages",
        {"id": "bad-1", "messages": conv("<image>q", "a")},
        "1 '<image>' tag(s) but the sample has no 'images'",
    ),
    "messages roles": (
        None,
        {"id": "bad-1", "images": [], "messages": conv("q", "a")[::-1]},
        "the first turn is 'assistant'; it must be 'user' (messages[0]",
    ),
    "part of unknown type": (
        None,
        {
            "id": "bad-1",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "audio"}]},
                {"role": "assistant", "content": "a"},
            ],
        },
        "messages[0].content[1] has type 'audio'; expected 'text', 'image' or 'image_url'",
    ),
    "remote image url": (
        None,
        {
            "id": "bad-1",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.jpg"}}]},
                {"role": "assistant", "content": "a"},
            ],
        },
        "images[0] is a remote URL ('https://x.org/a.jpg'); download the images and give their paths",
    ),
    "invalid base64 part": (
        None,
        {
            "id": "bad-1",
            "messages": [{"role": "user", "content": [{"type": "image", "base64": "not base64!"}]}, {"role": "assistant", "content": "a"}],
        },
        "messages[0].content[0]: 'base64' is not valid base64",
    ),
    "data url of no image": (
        None,
        {
            "id": "bad-1",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]},
                {"role": "assistant", "content": "a"},
            ],
        },
        "images[0] (embedded, 5 bytes) cannot be read as an image",
    ),
    "image part without a source": (
        None,
        {"id": "bad-1", "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}]},
        "messages[0].content[0] (image) has no 'path', 'url', 'image' or 'base64', and no image is left in the row's images",
    ),
    "images left over": (
        None,
        {
            "id": "bad-1",
            "images": ["a.jpg", "b.jpg"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
            ],
        },
        "1 images in 'images' are left over",
    ),
    "no messages at all": (None, {"id": "bad-1", "dialog": []}, "has no 'conversations' (nor 'messages'); set field_messages"),
    "named format, other layout": (
        "seed",
        {"id": "bad-1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "conversations[0] must be an object with 'role' and 'content'",
    ),
}


GOOD_ROWS = {
    "llava": {"id": "good-0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "messages": {"id": "good-0", "messages": conv("hi", "hello")},
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_rows_of_every_format_are_named_with_id_and_reason(tmp_path, images, case):
    fmt, row, reason = BAD_ROWS[case]
    good = GOOD_ROWS.get(fmt, {"id": "good-0", "conversations": conv("hi", "hello")})
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in (good, row)))
    cfg = make_cfg(tmp_path / "run", train=[source], **({"minicpmv_format": fmt} if fmt else {}))  # named at the top level
    with pytest.raises(InvalidDatasetError) as err:
        prepare_minicpmv_datasets(cfg)
    message = str(err.value)
    assert f"sample 'bad-1' (index 1): {reason}" in message, message
    assert f"{source}: 1 of 2 samples are invalid" in message
    assert not list((tmp_path / "run").rglob("*.parquet"))
    # skip mode drops just that row, in every format
    cfg = make_cfg(tmp_path / "run", train=[source], minicpmv_skip_bad_samples=True, **({"minicpmv_format": fmt} if fmt else {}))
    (result,) = prepare_minicpmv_datasets(cfg)
    assert (result.num_samples, result.num_skipped) == (1, 1)


def test_embedded_bytes_that_are_no_image_are_named_by_file_and_index(tmp_path, images):
    """Rows without ids (common in Parquet datasets) are named by index; broken embedded bytes by field and size."""
    features = datasets.Features(
        conversations=datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        image=datasets.Image(),
    )
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rows = [
        {"conversations": turns, "image": {"bytes": images["small"].read_bytes(), "path": None}},
        {"conversations": turns, "image": {"bytes": b"not an image", "path": "x.jpg"}},
    ]
    source = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(source))
    with pytest.raises(
        InvalidDatasetError,
        match=r"d\.parquet: 1 of 2 samples are invalid:\n  - sample at index 1: 'image' \(embedded, 12 bytes\) cannot be read",
    ):
        prepare_dataset_file(source, tmp_path / "out")
    result = prepare_dataset_file(source, tmp_path / "out", skip_bad_samples=True)
    (row,) = pq.read_table(result.path).to_pylist()
    assert row["image"] == [""] and row["image_bytes"] == [images["small"].read_bytes()] and row["image_sizes"] == [[200, 150]]


def test_a_dataset_folder_is_read_like_a_hub_id_with_its_split(tmp_path):
    """`path` + `split` through Axolotl's loader (a local folder of Parquet files stands in for the hub here)."""
    folder = tmp_path / "hub"
    for split, n in (("train", 3), ("validation", 2)):
        rows = [{"id": f"{split}-{i}", "messages": conv(f"q{i}", f"a{i}")} for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    cfg = make_cfg(tmp_path / "run")
    cfg.datasets = [DictDefault({"path": str(folder), "type": DATASET_TYPE, "split": "validation", "name": "default"})]
    prepare_minicpmv_datasets(cfg)
    assert cfg.datasets[0].split == "train" and cfg.datasets[0].name is None  # the prepared file has one split, no configs
    assert [r["id"] for r in load_prepared(cfg.datasets[0])] == ["validation-0", "validation-1"]
    cfg.datasets = [DictDefault({"path": str(folder), "type": DATASET_TYPE, "split": "test"})]
    with pytest.raises(InvalidDatasetError, match=r"hub \(split 'test'\): cannot be loaded as a dataset .*test"):
        prepare_minicpmv_datasets(cfg)


def test_a_saved_dataset_dict_uses_the_split(tmp_path):
    rows = {split: datasets.Dataset.from_list([{"id": f"{split}-0", "conversations": conv("q", "a")}]) for split in ("train", "test")}
    datasets.DatasetDict(rows).save_to_disk(str(tmp_path / "saved"))
    cfg = make_cfg(tmp_path / "run", test=[tmp_path / "saved"])
    cfg.test_datasets[0]["split"] = "test"
    prepare_minicpmv_datasets(cfg)
    assert [r["id"] for r in load_prepared(cfg.test_datasets[0])] == ["test-0"]


def test_image_root_resolves_relative_paths(tmp_path, images):
    source = write_json(tmp_path / "data" / "d.json", [{"id": "r", "image": "small.jpg", "conversations": conv("q", "a")}])
    cfg = make_cfg(tmp_path / "run", train=[source], minicpmv_image_root=str(images["small"].parent))
    prepare_minicpmv_datasets(cfg)
    assert [r["image"] for r in load_prepared(cfg.datasets[0])] == [[str(images["small"].resolve())]]
    # without the root the path is looked for next to the data file
    with pytest.raises(InvalidDatasetError, match=r"image 'small.jpg' not found \(looked for .*data/small.jpg\)"):
        prepare_minicpmv_datasets(make_cfg(tmp_path / "run2", train=[source]))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"minicpmv_format": "sharegpt"}, "minicpmv_format must be one of auto, seed, llava, messages, content_parts; got 'sharegpt'"),
        ({"message_property_mappings": {"role": "from", "weight": "w"}}, "message_property_mappings maps ['weight']"),
        ({"roles": {"tool": ["function"]}}, "roles maps to 'tool'; the roles are user, assistant, system"),
        ({"field_messages": ""}, "field_messages must be a column name"),
    ],
)
def test_format_settings_are_checked(tmp_path, entry, message):
    source = write_json(tmp_path / "d.json", [{"id": "t", "conversations": conv("q", "a")}])
    cfg = make_cfg(tmp_path / "run")
    cfg.datasets = [DictDefault({"path": str(source), "type": DATASET_TYPE, **entry})]
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare_minicpmv_datasets(cfg)


def test_json_lists_are_decoded_in_chunks(tmp_path, monkeypatch):
    """Samples longer than the read chunk, numbers cut at a chunk's end, odd spacing: the same as json.loads."""
    monkeypatch.setattr(formats, "JSON_CHUNK", 16)
    samples = [{"id": i, "conversations": conv("q" * (i * 7), "a"), "n": 12345678901234} for i in range(1, 30)]
    path = tmp_path / "d.json"
    path.write_text("\ufeff [\n" + " ,\n  ".join(json.dumps(s) for s in samples) + "\n]\n", encoding="utf-8")
    assert [row for _, row in formats._json_rows(path)] == samples
    path.write_text(json.dumps(samples[:3])[:-1] + ', {"id": 9,}]')
    with pytest.raises(InvalidDatasetError, match=r"not valid JSON \(sample at index 3: "):
        list(formats._json_rows(path))


def test_the_example_files_hold_the_same_samples(tmp_path):
    """examples/data's files in each format (written by examples/make_format_examples.py) agree with each other."""
    conversations = {}
    for name in ("llava.json", "messages.jsonl", "content_parts.parquet", "sharegpt_hf"):
        result = prepare_dataset_file(EXAMPLES / name, tmp_path / "out")
        rows = pq.read_table(result.path).to_pylist()
        conversations[name] = {r["id"]: (r["image_sizes"], [m["role"] for m in r["conversations"]]) for r in rows}
    assert len({json.dumps(c, sort_keys=True) for c in conversations.values()}) == 1, conversations
    assert len(conversations["llava.json"]) == 5
