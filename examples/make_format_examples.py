#!/usr/bin/env python3
"""Write examples/data's small files in the other formats the plugin reads, from the same samples and pictures.

    python examples/make_format_examples.py

From train.json (the official/seed format) it takes SAMPLES and writes them as
  llava.json            LLaVA / ShareGPT: conversations of {from, value}, image a path or a list of paths (JSON list)
  messages.jsonl        messages + images (LLaMA-Factory / ms-swift): {role, content} with <image> tags, images a list (JSONL)
  content_parts.parquet content parts (OpenAI / Axolotl): content lists of {type: text|image} parts; the pictures
                        embedded as bytes in an `images` column of datasets.Image (Parquet)
  sharegpt_hf/          a datasets.save_to_disk folder: conversations of {from, value} + images embedded (datasets.Image)
The text-only sample gets a system turn in every file (MiniCPM-V folds it into the first user turn).
Deterministic: re-running writes the same rows (tests/test_data_formats.py checks the files still match train.json).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "data"
SAMPLES = ("sample-0003", "sample-0005", "sample-0008", "sample-0011", "sample-0013")
SYSTEM = "You are a helpful assistant who answers briefly."
TAG = "<image>"


def seed_samples() -> list[dict]:
    """The chosen train.json samples with every image tag explicit and the system turn added."""
    by_id = {s["id"]: s for s in json.loads((ROOT / "train.json").read_text(encoding="utf-8"))}
    out = []
    for sample_id in SAMPLES:
        sample = json.loads(json.dumps(by_id[sample_id]))
        images = sample.get("image")
        images = [images] if isinstance(images, str) else list(images or [])
        turns = sample["conversations"]
        if len(images) == 1 and not any(TAG in t["content"] for t in turns):
            turns[0]["content"] = TAG + "\n" + turns[0]["content"]  # what the seed format does for an untagged image
        if not images:
            turns.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"id": sample_id, "images": images, "conversations": turns})
    return out


def parts(content: str) -> list[dict]:
    """A tagged string as content parts: an image part per tag; the newline after a tag is the parts' separator."""
    out = []
    for i, piece in enumerate(content.split(TAG)):
        if i:
            out.append({"type": "image", "text": None})
            piece = piece.removeprefix("\n")
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def main() -> None:
    import datasets

    samples = seed_samples()
    sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
    llava = []
    for s in samples:
        row = {"id": s["id"], "conversations": [{"from": sharegpt_role[t["role"]], "value": t["content"]} for t in s["conversations"]]}
        if s["images"]:
            row["image"] = s["images"][0] if len(s["images"]) == 1 else s["images"]
        llava.append(row)
    (ROOT / "llava.json").write_text(json.dumps(llava, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    lines = [json.dumps({"id": s["id"], "messages": s["conversations"], "images": s["images"]}, ensure_ascii=False) for s in samples]
    (ROOT / "messages.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def embedded(paths):
        return [{"bytes": (ROOT / p).read_bytes(), "path": Path(p).name} for p in paths]

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features(
        id=datasets.Value("string"),
        messages=datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
        images=datasets.List(datasets.Image()),
    )
    rows = [
        {
            "id": s["id"],
            "messages": [{"role": t["role"], "content": parts(t["content"])} for t in s["conversations"]],
            "images": embedded(s["images"]),
        }
        for s in samples
    ]
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(ROOT / "content_parts.parquet"))

    features = datasets.Features(
        id=datasets.Value("string"),
        conversations=datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        images=datasets.List(datasets.Image()),
    )
    rows = [{"id": r["id"], "conversations": r["conversations"], "images": embedded(s["images"])} for r, s in zip(llava, samples)]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(ROOT / "sharegpt_hf"))
    print(f"wrote {len(samples)} samples in 4 formats to {ROOT}")


if __name__ == "__main__":
    main()
