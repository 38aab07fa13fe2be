"""`MiniCPMVProcessor` / `MiniCPMVImageProcessor` as transformers classes: found by the Auto classes for an
official-layout checkpoint, saved and loaded symmetrically, and giving exactly what training (prompt strategy +
collator) and `chat` feed the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fixtures_data import conv, images, make_cfg, write_json  # noqa: F401
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from axolotl_minicpmv import MiniCPMVImageProcessor, MiniCPMVProcessor
from axolotl_minicpmv.inference.chat import image_features
from axolotl_minicpmv.integration.collator import collator_cls_and_kwargs
from axolotl_minicpmv.integration.data import normalize_sample
from axolotl_minicpmv.integration.prompt_strategy import MiniCPMVChatStrategy
from axolotl_minicpmv.model.processing_minicpmv import group_by_size, image_bounds


def test_auto_classes_give_the_projects_classes_without_remote_code(tiny_checkpoint):
    # the folder's preprocessor_config.json names remote code in auto_map, as the official release does
    assert "auto_map" in json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    image_processor = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(image_processor) is MiniCPMVImageProcessor and type(processor) is MiniCPMVProcessor
    assert (image_processor.max_slice_nums, image_processor.scale_resolution, image_processor.patch_size) == (9, 448, 14)
    assert image_processor.image_feature_size == 64 and image_processor.norm_mean == [0.5, 0.5, 0.5]


def test_a_folder_without_preprocessor_config_takes_the_slicing_keys_of_config_json(tiny_checkpoint, tmp_path):
    folder = tmp_path / "no-preprocessor"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "preprocessor_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_slice_nums": 4, "scale_resolution": 336}))
    for processor in (MiniCPMVProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
        assert (processor.image_processor.max_slice_nums, processor.image_processor.scale_resolution) == (4, 336)


def test_config_jsons_slicing_keys_win_over_the_preprocessor_file(tiny_checkpoint, tmp_path):
    """The official code slices by config.json (its preprocessor file has no slice_mode): the processor that training
    and the server load from the folder slices as `chat` and `predict` do, from the model's config."""
    from axolotl_minicpmv import MiniCPMV

    folder = tmp_path / "unsliced"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "slice_mode": False, "max_slice_nums": 4}))
    assert (folder / "preprocessor_config.json").is_file()
    model_config = MiniCPMV.config_class.from_pretrained(folder)
    keys = ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size", "slice_mode", "norm_mean", "norm_std")
    expected = [getattr(MiniCPMVImageProcessor.from_model_config(model_config), key) for key in keys]
    for processor in (MiniCPMVProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
        assert [getattr(processor.image_processor, key) for key in keys] == expected
        assert (processor.image_processor.slice_mode, processor.image_processor.max_slice_nums) == (False, 4)
    assert MiniCPMVProcessor.from_pretrained(folder, max_slice_nums=2).image_processor.max_slice_nums == 2  # arguments win
    # training's image processor, with minicpmv_max_slice_nums left unset (None): the folder's config.json decides
    from axolotl_minicpmv.integration.args import image_processor_for

    training = image_processor_for({"base_model": str(folder)})
    assert (training.slice_mode, training.max_slice_nums) == (False, 4) and training.layout((1344, 896)).grid is None


def test_save_pretrained_and_from_pretrained_round_trip(tiny_checkpoint, tmp_path):
    processor = MiniCPMVProcessor.from_pretrained(tiny_checkpoint, max_slice_nums=3)
    processor.save_pretrained(tmp_path / "saved")
    again = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert type(again) is MiniCPMVProcessor
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.image_processor.max_slice_nums == 3
    msgs = [{"role": "user", "content": "<image> what is this?"}, {"role": "assistant", "content": "A box."}]
    picture = Image.new("RGB", (900, 400), (5, 90, 200))
    a, b = processor([msgs], [[picture]], return_labels=True), again([msgs], [[picture]], return_labels=True)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "image_bound", "vision_order"))


def test_processor_output_equals_what_training_feeds_the_model(tiny_tokenizer, images, tmp_path):
    """Prompt strategy + collator (Axolotl's path) vs one processor call: same ids, labels, pixels, bounds."""
    samples = [
        {"id": "a", "image": str(images["wide"]), "conversations": conv("<image>\nWhat is it?", "A wide box.", "Sure?", "Yes.")},
        {"id": "b", "conversations": conv("Just text.", "Fine.")},
        {"id": "c", "image": [str(images["grid"]), str(images["small"])], "conversations": conv("<image> vs <image>", "Two.")},
    ]
    strategy = MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=4096)
    rows = [strategy.tokenize_prompt(normalize_sample(s, i, tmp_path)) for i, s in enumerate(samples)]
    cls, kwargs = collator_cls_and_kwargs(make_cfg(tmp_path))
    collated = cls(tiny_tokenizer, padding=True, pad_to_multiple_of=64, return_tensors="pt", **kwargs)(rows)

    processor = MiniCPMVProcessor(MiniCPMVImageProcessor(), tiny_tokenizer)
    pictures = [[Image.open(p) for p in ([s["image"]] if isinstance(s.get("image"), str) else s.get("image", []))] for s in samples]
    direct = processor([s["conversations"] for s in samples], pictures, return_labels=True, pad_to_multiple_of=64)
    for key in ("input_ids", "attention_mask", "labels", "vision_order", "image_bound"):
        assert torch.equal(direct[key], collated[key]), key
    assert len(direct["pixel_values"]) == len(collated["pixel_values"]) >= 3  # one stack per image size
    assert all(torch.equal(a, b) for a, b in zip(direct["pixel_values"], collated["pixel_values"]))


def test_processor_output_equals_what_chat_feeds_the_model(tiny_model, tiny_tokenizer, images):
    """`processor(...)` for one conversation = chat's prompt ids, its image features' pixels and its bounds."""
    msgs = [
        {"role": "user", "content": "What is in the image?"},
        {"role": "assistant", "content": "A grid."},
        {"role": "user", "content": "Colours?"},
    ]
    picture = Image.open(images["grid"]).convert("RGB")
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    batch = processor([msgs], [[picture]])
    chat_ids = processor.encode_prompt(processor.chat_prompt(msgs, picture)).unsqueeze(0)
    assert torch.equal(batch["input_ids"], chat_ids)
    assert torch.equal(batch["image_bound"], image_bounds(chat_ids, tiny_tokenizer.im_start_id, tiny_tokenizer.im_end_id, count=5))
    with torch.no_grad():
        from_batch = tiny_model.get_image_features(batch["pixel_values"], batch["vision_order"])
        from_chat = image_features(tiny_model, picture, processor, tiny_model.encode_images)
    # Equal up to float32 rounding: the batch encodes the 448x448 source and its four 448x448 cells as one stack of
    # 5, chat the cells as 4 and the source alone, and torch's CPU kernels may round a batch of 1 differently (1.7e-6
    # on the source's row with torch 2.13 and timm 1.0.31; the cells' rows are identical).
    torch.testing.assert_close(from_batch, from_chat, rtol=1e-5, atol=1e-5)
    # and the answer of a greedy chat is what generating from the processor's batch gives
    answer, _, _ = tiny_model.chat(picture, msgs, tokenizer=tiny_tokenizer, sampling=False, num_beams=1, max_new_tokens=12)
    embeds = tiny_model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["vision_order"], batch["image_bound"])
    with torch.no_grad():
        out = tiny_model.generate(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            max_new_tokens=12,
            num_beams=1,
            do_sample=False,
            repetition_penalty=1.2,
            pad_token_id=0,
            eos_token_id=2,
        )
    from axolotl_minicpmv.inference.chat import decode_answer

    assert decode_answer(out[0], tiny_tokenizer) == answer


def test_one_layout_per_picture_serves_placeholder_and_pixels(tiny_tokenizer):
    processor = MiniCPMVProcessor(MiniCPMVImageProcessor(), tiny_tokenizer)
    picture = Image.new("RGB", (1200, 300), (1, 2, 3))
    layout = processor.layout(picture)
    assert (layout.grid, layout.num_images) == ((3, 1), 4)
    assert processor.image_placeholder(layout).count("<image>") == layout.num_images
    pixels = processor.pixel_values(picture, layout=layout)
    assert [tuple(p.shape[-2:][::-1]) for p in pixels] == [layout.source] + [layout.cell] * 3


def test_slice_mode_false_in_the_checkpoint_config_gives_one_unsliced_image(tiny_checkpoint, tmp_path):
    """The official code with `slice_mode: false` feeds the picture as it is, with one placeholder."""
    folder = tmp_path / "no-slices"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "preprocessor_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "slice_mode": False}))
    processor = MiniCPMVProcessor.from_pretrained(folder)
    picture = Image.new("RGB", (1200, 300), (9, 9, 9))
    batch = processor([[{"role": "user", "content": "<image>What?"}]], [[picture]])
    assert len(batch["image_bound"]) == 1
    (group,) = batch["pixel_values"]
    assert tuple(group.shape) == (1, 3, 300, 1200)


def test_group_by_size_is_the_image_processors():
    pixels = [torch.zeros(3, 14, 28), torch.zeros(3, 28, 14), torch.ones(3, 14, 28)]
    groups, order = group_by_size(pixels)
    assert [tuple(g.shape) for g in groups] == [(2, 3, 14, 28), (1, 3, 28, 14)]
    assert order.tolist() == [0, 2, 1]  # per-group outputs concatenated, then indexed by order: the original order
    assert torch.equal(groups[0][1], pixels[2])
