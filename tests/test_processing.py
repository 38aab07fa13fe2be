"""Images and prompts: placeholder layout, chat prompts, prompt ids, image bounds, pixels and input checks.

Expected strings are built by hand from the rules in MINICPMV.md ("Prompt and image placeholders")
and the grids the official slicing gives (see tests/test_slicing.py).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from PIL import Image

from axolotl_minicpmv.model.conversation import validate_conversation as validate_messages  # noqa: E402
from axolotl_minicpmv.model.image_processing_minicpmv import MiniCPMVImageProcessor  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import (
    InvalidInputError,
    MiniCPMVProcessor,
    group_by_size,
    image_bounds,
    load_image,
)

to_pixel_values = MiniCPMVImageProcessor().to_pixel_values

ONE = "<image>" + "<unk>" * 64 + "</image>"


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return MiniCPMVProcessor(MiniCPMVImageProcessor(), tiny_tokenizer)


def _image(size, color=(10, 200, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


# ---------------------------------------------------------------- placeholders


def test_placeholder_of_an_unsliced_image_is_one_block_of_64_unk(processor):
    assert processor.image_placeholder((448, 448)) == ONE
    assert processor.image_placeholder((200, 150)) == ONE


@pytest.mark.parametrize(
    "size, cols, rows",
    [
        ((1344, 896), 3, 2),  # official grid for 1344x896
        ((896, 448), 2, 1),
        ((448, 896), 1, 2),
        ((1344, 1344), 3, 3),
        ((8000, 200), 9, 1),
    ],
)
def test_placeholder_of_a_sliced_image_is_source_then_slice_rows(processor, size, cols, rows):
    expected = ONE + "<slice>" + "\n".join([ONE * cols] * rows) + "</slice>"
    text = processor.image_placeholder(size)
    assert text == expected
    assert text.count("<unk>") == 64 * (1 + cols * rows)
    assert text.count("\n") == rows - 1


def test_placeholder_count_matches_the_images_for_the_vision_tower(processor):
    image = Image.open(EXAMPLES / "images" / "landscape.jpg")  # 1344x896: 3x2 grid
    images = processor.vision_images(image)
    assert len(images) == 1 + 6
    assert images[0].size == (546, 364), "the source comes first (official source size)"
    assert {im.size for im in images[1:]} == {(448, 448)}
    assert processor.image_placeholder(image.size).count("<image>") == len(images)
    pixels = processor.pixel_values(image)
    assert [tuple(p.shape) for p in pixels] == [(3, im.height, im.width) for im in images]


def test_max_slice_nums_of_the_processor_is_used(tiny_tokenizer):
    one_slice = MiniCPMVProcessor(MiniCPMVImageProcessor(max_slice_nums=1), tiny_tokenizer)
    assert one_slice.image_placeholder((1344, 1344)) == ONE
    assert len(one_slice.vision_images(_image((1344, 1344)))) == 1


# ---------------------------------------------------------------- chat prompts


def test_chat_prompt_single_turn_with_image(processor):
    msgs = [{"role": "user", "content": "What is this?"}]
    prompt = processor.chat_prompt(msgs, _image((448, 448)))
    assert prompt == "<用户>" + ONE + "\nWhat is this?<AI>"


def test_chat_prompt_with_a_sliced_image(processor):
    msgs = [{"role": "user", "content": "Read it."}]
    prompt = processor.chat_prompt(msgs, _image((896, 448)))
    assert prompt == "<用户>" + ONE + "<slice>" + ONE + ONE + "</slice>" + "\nRead it.<AI>"


def test_chat_prompt_multi_turn_puts_the_image_in_the_first_user_turn_only(processor):
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    prompt = processor.chat_prompt(msgs, _image((300, 300)))
    assert prompt == "<用户>" + ONE + "\nQ1" + "<AI>A1" + "<用户>Q2" + "<AI>"
    assert prompt.count("<image>") == 1


def test_chat_prompt_text_only(processor):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert processor.chat_prompt(msgs, None) == "<用户>Hi<AI>Hello<用户>Bye<AI>"


def test_chat_prompt_accepts_json_string(processor):
    msgs = [{"role": "user", "content": "Hi"}]
    assert processor.chat_prompt(json.dumps(msgs), None) == processor.chat_prompt(msgs, None) == "<用户>Hi<AI>"


# ---------------------------------------------------------------- prompt ids


def test_encode_prompt_adds_bos_and_keeps_every_image_slot(processor, tiny_tokenizer):
    prompt = processor.chat_prompt([{"role": "user", "content": "What is this?"}], _image((896, 448)))
    ids = processor.encode_prompt(prompt)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[0].item() == tiny_tokenizer.bos_token_id == 1
    assert (ids == tiny_tokenizer.bos_token_id).sum().item() == 1
    assert ids[1:].tolist() == tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert (ids == tiny_tokenizer.unk_token_id).sum().item() == 64 * 3
    assert (ids == tiny_tokenizer.im_start_id).sum().item() == 3
    assert (ids == tiny_tokenizer.slice_start_id).sum().item() == 1


def test_encode_prompt_refuses_to_cut_a_long_prompt(processor):
    prompt = processor.chat_prompt([{"role": "user", "content": "What is this?"}], _image((448, 448)))
    full = processor.encode_prompt(prompt)
    n = len(full)
    assert torch.equal(processor.encode_prompt(prompt, max_inp_length=n), full), "exactly max_inp_length is fine"
    with pytest.raises(InvalidInputError) as err:
        processor.encode_prompt(prompt, max_inp_length=n - 1)
    message = str(err.value)
    assert str(n) in message and f"max_inp_length={n - 1}" in message


def test_inference_inputs_are_the_ids_and_pixels_of_the_processors_batch(processor):
    conversation = [
        {"role": "user", "content": "Compare <image> with <image>."},
        {"role": "assistant", "content": "The first is wider."},
        {"role": "user", "content": "And the colours?"},
    ]
    images = [_image((1344, 896), (200, 30, 10)), _image((300, 200))]  # a sliced (3x2) picture, then a whole one
    ids, pixels = processor.inference_inputs(conversation, images, max_length=2048)
    batch = processor([conversation], [images], max_length=2048)
    assert ids == batch["input_ids"][0].tolist()
    assert len(pixels) == 1 + 6 + 1  # each picture's source, then its cells, in placeholder order
    stacked = [p for group in batch["pixel_values"] for p in group]  # the batch's pixels grouped by size
    assert all(torch.equal(p, stacked[k]) for p, k in zip(pixels, batch["vision_order"].tolist()))
    with pytest.raises(InvalidInputError, match="max_inp_length=10"):
        processor.inference_inputs(conversation, images, max_length=10)
    # the server tokenizes from the pictures' headers, before decoding them, and keeps these ids
    assert processor.prompt_ids(conversation, [(1344, 896), (300, 200)], max_length=len(ids)) == ids
    with pytest.raises(InvalidInputError, match=f"max_inp_length={len(ids) - 1}"):
        processor.prompt_ids(conversation, [(1344, 896), (300, 200)], max_length=len(ids) - 1)


def test_image_bounds_of_a_real_prompt_cover_the_unk_slots(processor, tiny_tokenizer):
    prompt = processor.chat_prompt([{"role": "user", "content": "Describe."}], _image((1344, 896)))
    ids = processor.encode_prompt(prompt)
    bounds = image_bounds(ids, tiny_tokenizer.im_start_id, tiny_tokenizer.im_end_id)
    assert bounds.shape == (7, 3)
    for row, start, end in bounds.tolist():
        assert row == 0
        assert end - start == 64
        assert ids[start - 1].item() == tiny_tokenizer.im_start_id
        assert ids[end].item() == tiny_tokenizer.im_end_id
        assert set(ids[start:end].tolist()) == {tiny_tokenizer.unk_token_id}
    covered = torch.zeros_like(ids, dtype=torch.bool)
    for _, start, end in bounds.tolist():
        covered[start:end] = True
    assert torch.equal(covered, ids == tiny_tokenizer.unk_token_id), "every <unk> slot, and nothing else"


# ---------------------------------------------------------------- image bounds on hand-built ids

S, E = 7, 9  # stand-ins for <image> / </image>


def test_image_bounds_values_on_hand_built_ids():
    ids = torch.tensor([1, S, 0, 0, 0, E, 5, S, 0, 0, E, 4])
    # [index after <image>, index of </image>)
    assert image_bounds(ids, S, E).tolist() == [[0, 2, 5], [0, 8, 10]]


def test_image_bounds_on_a_batch():
    ids = torch.tensor([[S, 0, E, 3, 3, 3], [3, 3, S, 0, 0, E]])
    assert image_bounds(ids, S, E).tolist() == [[0, 1, 2], [1, 3, 5]]


def test_image_bounds_without_images_is_empty():
    bounds = image_bounds(torch.tensor([1, 2, 3]), S, E)
    assert bounds.shape == (0, 3)


@pytest.mark.parametrize(
    "ids",
    [
        [1, S, 0, 0],  # cut inside a placeholder: no </image>
        [1, 0, 0, E],  # </image> without <image>
        [1, E, 0, S],  # wrong order
        [S, 0, E, S, 0],  # second one unpaired
    ],
)
def test_image_bounds_errors_when_unpaired(ids):
    with pytest.raises(InvalidInputError, match="do not pair up"):
        image_bounds(torch.tensor(ids), S, E)


# ---------------------------------------------------------------- pixels


def test_group_by_size_round_trip():
    sizes = [(28, 42), (14, 14), (28, 42), (42, 28), (14, 14), (28, 42)]
    images = [torch.full((3, h, w), float(i)) for i, (h, w) in enumerate(sizes)]
    groups, order = group_by_size(images)
    assert sorted(tuple(g.shape) for g in groups) == sorted([(3, 3, 28, 42), (2, 3, 14, 14), (1, 3, 42, 28)])
    assert order.dtype == torch.long and sorted(order.tolist()) == list(range(6))
    # per-group outputs (here: the mean of each image) concatenated, indexed by `order`
    outputs = torch.cat([g.mean(dim=(1, 2, 3)) for g in groups])
    assert outputs[order].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # images inside one group keep their relative order
    for g in groups:
        values = g[:, 0, 0, 0].tolist()
        assert values == sorted(values)


def test_group_by_size_of_one_size_is_one_stack():
    images = [torch.randn(3, 14, 28) for _ in range(3)]
    groups, order = group_by_size(images)
    assert len(groups) == 1 and torch.equal(groups[0], torch.stack(images))
    assert order.tolist() == [0, 1, 2]


def test_to_pixel_values_scales_and_normalises():
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[0, 0] = (0, 128, 255)
    array[1, 2] = (255, 0, 51)
    pixels = to_pixel_values(Image.fromarray(array))
    assert pixels.shape == (3, 2, 3) and pixels.dtype == torch.float32
    expected = torch.from_numpy((array.astype(np.float64) / 255 - 0.5) / 0.5).permute(2, 0, 1).float()
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    assert pixels[:, 0, 0].tolist() == pytest.approx([-1.0, (128 / 255 - 0.5) / 0.5, 1.0], abs=1e-6)
    assert pixels[:, 1, 2].tolist() == pytest.approx([1.0, -1.0, (51 / 255 - 0.5) / 0.5], abs=1e-6)


def test_to_pixel_values_range_on_a_real_image():
    pixels = to_pixel_values(Image.open(EXAMPLES / "images" / "clock.jpg").convert("RGB"))
    assert pixels.shape == (3, 448, 448)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() < -0.5 and pixels.max() > 0.5, "the real image spans most of the range"


# ---------------------------------------------------------------- messages


def test_validate_messages_accepts_list_and_json_string():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert validate_messages(msgs) == msgs
    assert validate_messages(json.dumps(msgs)) == msgs


@pytest.mark.parametrize(
    "msgs, match",
    [
        ({"role": "user", "content": "Hi"}, "non-empty list"),
        ([], "non-empty list"),
        ("[{'role': 'user'", "not valid JSON"),
        ("not json at all", "not valid JSON"),
        ('{"role": "user", "content": "Hi"}', "non-empty list"),
        ([{"role": "user"}], r"msgs\[0\].*'role' and 'content'"),
        ([{"content": "Hi"}], r"msgs\[0\].*'role' and 'content'"),
        (["Hi"], r"msgs\[0\].*'role' and 'content'"),
        ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}], r"msgs\[1\].*unknown role 'system'"),
        ([{"role": "user", "content": ""}], r"msgs\[0\].*non-empty string"),
        ([{"role": "user", "content": "   "}], r"msgs\[0\].*non-empty string"),
        ([{"role": "user", "content": None}], r"msgs\[0\].*non-empty string"),
        ([{"role": "assistant", "content": "Hello"}], r"msgs\[0\].*first message must come from 'user'"),
    ],
)
def test_validate_messages_errors(msgs, match):
    with pytest.raises(InvalidInputError, match=match):
        validate_messages(msgs)


def test_chat_prompt_validates_messages(processor):
    with pytest.raises(InvalidInputError, match="first message"):
        processor.chat_prompt([{"role": "assistant", "content": "Hello"}], None)


# ---------------------------------------------------------------- images in


@pytest.fixture(scope="module")
def jpeg_path():
    return EXAMPLES / "images" / "stop_sign.jpg"


def test_load_image_accepts_pil_path_bytes_and_base64(jpeg_path):
    data = jpeg_path.read_bytes()
    reference = np.asarray(Image.open(jpeg_path).convert("RGB"))
    for source in (Image.open(jpeg_path), jpeg_path, str(jpeg_path), data, base64.b64encode(data).decode("ascii")):
        image = load_image(source)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), reference), type(source).__name__


def test_load_image_converts_to_rgb():
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).mode == "RGB"
    assert load_image(Image.new("L", (5, 5), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_load_image_corrupt_bytes():
    with pytest.raises(InvalidInputError, match="photo: cannot decode image data"):
        load_image(b"this is not an image", what="photo")


def test_load_image_invalid_base64_or_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="picture: not an existing file and not valid base64"):
        load_image("@@@ not base64 @@@", what="picture")
    with pytest.raises(InvalidInputError, match="not an existing file and not valid base64"):
        load_image(str(tmp_path / "missing.jpg"))


def test_load_image_missing_path_object_names_the_file(tmp_path):
    """A pathlib.Path that does not exist is a missing file, not an unsupported type."""
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InvalidInputError) as err:
        load_image(missing, what="photo")
    message = str(err.value)
    assert message.startswith("photo:")
    assert str(missing) in message, f"the message should name the missing file: {message}"


def test_load_image_valid_base64_of_non_image_data():
    with pytest.raises(InvalidInputError, match="cannot decode image data"):
        load_image(base64.b64encode(b"plain text, not pixels").decode("ascii"))


def test_load_image_unreadable_files(tmp_path, jpeg_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00\x01 definitely not a jpeg")
    with pytest.raises(InvalidInputError, match="cannot decode image data"):
        load_image(garbage)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg_path.read_bytes()[:400])
    with pytest.raises(InvalidInputError, match="cannot decode image data"):
        load_image(truncated)


def test_load_image_wrong_type():
    with pytest.raises(InvalidInputError, match="expected a PIL image, a path, bytes or base64, got int"):
        load_image(42)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_to_device_copies_to_the_gpu_and_passes_gpu_tensors_through():
    from axolotl_minicpmv.model.transfer import to_device

    host = torch.arange(12).reshape(3, 4)
    on_gpu = to_device(host, "cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), host)
    assert to_device(on_gpu, "cuda") is on_gpu


@pytest.mark.parametrize("size", [(4032, 3024), (6000, 4000), (3840, 2160), (4000, 3000), (3000, 3000), (2600, 2000)])
def test_a_photo_scaled_down_to_4_million_pixels_is_sliced_as_the_original(size):
    """The chat page scales pictures over 4 million pixels down (serving/static/index.html, MAX_PIXELS) before
    sending them: above 9 x 448 x 448 pixels the layout depends on the aspect ratio, so common photo sizes keep
    theirs (rounding a side can move some other sizes' cells by a 14-pixel patch, or a panorama's grid)."""
    processor = MiniCPMVImageProcessor()
    factor = (4_000_000 / (size[0] * size[1])) ** 0.5
    original, scaled = processor.layout(size), processor.layout((int(size[0] * factor), int(size[1] * factor)))
    assert (scaled.source, scaled.cell, scaled.grid) == (original.source, original.cell, original.grid)
