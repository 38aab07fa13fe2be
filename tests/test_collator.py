"""Collator: padded ids/labels, pixels sliced and grouped by size in placeholder order, image bounds,
layout checks with the sample id, picklable, and a real forward + backward of the tiny model."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from fixtures_data import conv, images, load_prepared, make_cfg, prepared_examples, write_json  # noqa: F401

from axolotl_minicpmv.integration.collator import collator_cls_and_kwargs
from axolotl_minicpmv.integration.data import prepare_minicpmv_datasets
from axolotl_minicpmv.integration.prompt_strategy import MiniCPMVChatStrategy
from axolotl_minicpmv.model.image_processing_minicpmv import MiniCPMVImageProcessor
from axolotl_minicpmv.model.processing_minicpmv import InvalidInputError, MiniCPMVProcessor, load_image

IM_START, IM_END = 101, 102


@pytest.fixture(scope="module")
def rows(prepared_examples, tiny_tokenizer):
    """Tokenized example rows by id, as the Trainer hands them to the collator."""
    strategy = MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=4096)
    return {r["id"]: strategy.tokenize_prompt(r) for r in load_prepared(prepared_examples.datasets[0])}


def make_collator(tokenizer, **kwargs):
    # exactly how Axolotl's builder calls it, plus the plugin's kwargs
    cls, plugin_kwargs = collator_cls_and_kwargs(make_cfg("unused"))
    return cls(tokenizer, padding=True, pad_to_multiple_of=64, return_tensors="pt", **{**plugin_kwargs, **kwargs})


def vision_images(tokenizer, batch_rows):
    processor = MiniCPMVProcessor(MiniCPMVImageProcessor(), tokenizer)
    return [px for row in batch_rows for path in row["image"] for px in processor.pixel_values(load_image(path))]


def test_padding_to_a_multiple_of_64(rows, tiny_tokenizer):
    batch_rows = [rows["sample-0011"], rows["sample-0005"], rows["sample-0012"]]  # text-only, one image, two images
    batch = make_collator(tiny_tokenizer)(batch_rows)
    assert list(batch) == ["input_ids", "attention_mask", "labels", "pixel_values", "vision_order", "image_bound"]
    longest = max(len(r["input_ids"]) for r in batch_rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, math.ceil(longest / 64) * 64)
    for i, row in enumerate(batch_rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"] and set(batch["input_ids"][i, n:].tolist()) <= {0}
        assert batch["labels"][i, :n].tolist() == row["labels"] and set(batch["labels"][i, n:].tolist()) <= {-100}
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert all(t.dtype == torch.long for t in (batch["input_ids"], batch["labels"], batch["attention_mask"]))


def test_pixels_grouped_by_size_and_bounds_follow_the_placeholders(rows, tiny_tokenizer):
    # 1344x896 landscape (3x2 slices), 200x150 stop sign, landscape + street again (two images)
    batch_rows = [rows["sample-0001"], rows["sample-0005"], rows["sample-0012"]]
    batch = make_collator(tiny_tokenizer)(batch_rows)
    expected = vision_images(tiny_tokenizer, batch_rows)  # source then cells, image after image, row after row

    groups, order = batch["pixel_values"], batch["vision_order"]
    sizes = [tuple(g.shape[-2:]) for g in groups]
    assert len(set(sizes)) == len(sizes) and all(g.dim() == 4 and g.shape[1] == 3 for g in groups)
    assert sum(len(g) for g in groups) == len(expected) == len(order)
    flat = [image for group in groups for image in group]
    for k, image in enumerate(expected):  # torch.cat(groups)[vision_order] is the original order
        assert torch.equal(flat[order[k]], image)

    bounds = batch["image_bound"]
    assert bounds.dtype == torch.long and bounds.shape == (len(expected), 3)
    ids = batch["input_ids"]
    for row, start, end in bounds.tolist():
        assert ids[row, start - 1] == IM_START and ids[row, end] == IM_END and end - start == 64
    for i, row in enumerate(batch_rows):
        assert (bounds[:, 0] == i).sum() == row["input_ids"].count(IM_START)
    assert bounds[:, 0].tolist() == sorted(bounds[:, 0].tolist())  # row-major, as the pixels


def test_batch_without_images_has_only_text_keys(rows, tiny_tokenizer):
    batch = make_collator(tiny_tokenizer)([rows["sample-0011"], rows["sample-0016"]])
    assert list(batch) == ["input_ids", "attention_mask", "labels"]


def test_collator_pickles_for_dataloader_workers(rows, tiny_tokenizer):
    collator = make_collator(tiny_tokenizer)
    batch_rows = [rows["sample-0005"], rows["sample-0011"]]
    before = collator(batch_rows)  # also after its processor was built
    clone = pickle.loads(pickle.dumps(collator))
    after = clone(batch_rows)
    assert all(torch.equal(before[k], after[k]) for k in ("input_ids", "labels", "vision_order", "image_bound"))
    assert all(torch.equal(a, b) for a, b in zip(before["pixel_values"], after["pixel_values"]))


def test_layout_mismatch_names_the_sample(rows, tiny_tokenizer):
    # tokenized with max_slice_nums 9, collated with 1: fewer vision images than placeholders
    with pytest.raises(InvalidInputError, match=r"sample 'sample-0001': 1 vision images .* but 7 image placeholders.*max_slice_nums \(1\)"):
        make_collator(tiny_tokenizer, max_slice_nums=1)([rows["sample-0001"]])


def test_missing_image_column_is_explained(rows, tiny_tokenizer):
    row = {k: v for k, v in rows["sample-0005"].items() if k not in ("image", "image_sizes")}
    with pytest.raises(InvalidInputError, match="remove_unused_columns: false"):
        make_collator(tiny_tokenizer)([row])


def test_image_changed_after_preparation(tmp_path, tiny_tokenizer, images):
    sample = {"id": "cat", "image": str(images["small"]), "conversations": conv("<image>", "A cat.")}
    cfg = make_cfg(tmp_path / "run", train=[write_json(tmp_path / "d.json", [sample])])
    prepare_minicpmv_datasets(cfg)
    (prepared,) = load_prepared(cfg.datasets[0])
    row = MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=4096).tokenize_prompt(prepared)
    images["square"].replace(images["small"])  # same path, now 448x448
    with pytest.raises(InvalidInputError, match=r"sample 'cat': image .*small\.jpg is 448x448 but the dataset was prepared for 200x150"):
        make_collator(tiny_tokenizer)([row])


@pytest.fixture(scope="module")
def train_model(tiny_checkpoint_fp32):
    from axolotl_minicpmv import MiniCPMV

    torch.manual_seed(0)
    return MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32)


def test_forward_and_backward_of_the_tiny_model(rows, tiny_tokenizer, train_model):
    model = train_model
    # a sliced image (800x600: source + 2x2 slices), a small one, and a text-only row
    batch = make_collator(tiny_tokenizer)([rows["sample-0014"], rows["sample-0005"], rows["sample-0011"]])

    model.eval()
    with torch.no_grad():
        out = model(**batch)
        # the model shifts: position i-1 is scored against labels[i]
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        assert torch.allclose(out.loss, expected, atol=1e-5)
        blank = {**batch, "pixel_values": [torch.zeros_like(g) for g in batch["pixel_values"]]}
        assert not torch.allclose(model(**blank).loss, out.loss)  # the pixels reach the loss

    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for prefix in ("vpm.", "resampler.", "llm.model.embed_tokens", "llm.lm_head"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix
