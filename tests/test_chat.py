"""Chat: `model.chat` (official signature and generation defaults, context, decoding) and the seed's
`MiniCPMVChat` helper (base64 image + JSON question in, answer out).

Greedy generation is pinned against argmax decoding done by hand with the model's forward.
"""

from __future__ import annotations

import base64
import copy
import json
import logging

import pytest
import torch
from conftest import EXAMPLES
from PIL import Image

from axolotl_minicpmv import InvalidInputError, MiniCPMVChat, img2base64
from axolotl_minicpmv.inference.chat import decode_answer, image_features
from axolotl_minicpmv.inference.chat_helper import pick_device
from axolotl_minicpmv.model.conversation import validate_conversation
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor, group_by_size, image_bounds

CLOCK = EXAMPLES / "images" / "clock.jpg"  # 448x448: one image, no slices
SAMPLING_DEFAULTS = {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True, "repetition_penalty": 1.05}
BEAM_DEFAULTS = {"num_beams": 3, "repetition_penalty": 1.2}
MSGS = [{"role": "user", "content": "What is in the image?"}]


@pytest.fixture(scope="module")
def clock():
    return Image.open(CLOCK).convert("RGB")


def _chat(model, tokenizer, image, msgs=MSGS, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return model.chat(image=image, msgs=msgs, context=None, tokenizer=tokenizer, **kwargs)


# ---------------------------------------------------------------- generation defaults


def test_sampling_defaults(tiny_model, tiny_tokenizer, clock):
    torch.manual_seed(0)
    answer, context, config = _chat(tiny_model, tiny_tokenizer, clock, sampling=True)
    assert config == SAMPLING_DEFAULTS
    assert isinstance(answer, str)


def test_beam_search_defaults(tiny_model, tiny_tokenizer, clock):
    _, _, config = _chat(tiny_model, tiny_tokenizer, clock, sampling=False)
    assert config == BEAM_DEFAULTS


def test_kwargs_override_only_the_default_keys(tiny_model, tiny_tokenizer, clock, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        _, _, config = _chat(tiny_model, tiny_tokenizer, clock, sampling=True, temperature=0.3, top_k=5, num_beams=4, length_penalty=2.0)
    assert config == {**SAMPLING_DEFAULTS, "temperature": 0.3, "top_k": 5}
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "num_beams" in warnings and "length_penalty" in warnings, "ignored keys are named in a warning"

    _, _, config = _chat(tiny_model, tiny_tokenizer, clock, sampling=False, num_beams=2, temperature=0.3)
    assert config == {"num_beams": 2, "repetition_penalty": 1.2}


def test_sampling_is_reproducible_with_a_seed(tiny_model, tiny_tokenizer, clock):
    answers = []
    for _ in range(2):
        torch.manual_seed(123)
        answers.append(_chat(tiny_model, tiny_tokenizer, clock, sampling=True, max_new_tokens=8)[0])
    assert answers[0] == answers[1]


# ---------------------------------------------------------------- context and messages


def test_context_is_msgs_plus_the_answer_and_msgs_are_not_mutated(tiny_model, tiny_tokenizer, clock):
    msgs = [
        {"role": "user", "content": "What is in the image?"},
        {"role": "assistant", "content": "A clock."},
        {"role": "user", "content": "What time does it show?"},
    ]
    before = copy.deepcopy(msgs)
    answer, context, _ = _chat(tiny_model, tiny_tokenizer, clock, msgs=msgs, sampling=False)
    assert msgs == before, "msgs must not be modified"
    assert len(msgs) == 3
    assert context == before + [{"role": "assistant", "content": answer}]


def test_json_string_msgs_give_the_same_answer(tiny_model, tiny_tokenizer, clock):
    as_list = _chat(tiny_model, tiny_tokenizer, clock, msgs=MSGS, sampling=False)
    as_json = _chat(tiny_model, tiny_tokenizer, clock, msgs=json.dumps(MSGS), sampling=False)
    assert as_json[0] == as_list[0]
    assert as_json[1] == as_list[1] == MSGS + [{"role": "assistant", "content": as_list[0]}]


def test_text_only_chat(tiny_model, tiny_tokenizer):
    answer, context, _ = _chat(tiny_model, tiny_tokenizer, None, msgs=[{"role": "user", "content": "Hello"}], sampling=False)
    assert isinstance(answer, str)
    assert context == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": answer}]


def test_image_may_be_a_path_or_base64(tiny_model, tiny_tokenizer, clock):
    from_pil = _chat(tiny_model, tiny_tokenizer, clock, sampling=False)[0]
    assert _chat(tiny_model, tiny_tokenizer, str(CLOCK), sampling=False)[0] == from_pil
    assert _chat(tiny_model, tiny_tokenizer, img2base64(CLOCK), sampling=False)[0] == from_pil


def test_beam_search_is_deterministic(tiny_model, tiny_tokenizer, clock):
    first = _chat(tiny_model, tiny_tokenizer, clock, sampling=False, max_new_tokens=10)[0]
    second = _chat(tiny_model, tiny_tokenizer, clock, sampling=False, max_new_tokens=10)[0]
    assert first == second


def test_an_empty_earlier_answer_goes_back_as_context(tiny_model, tiny_tokenizer, clock):
    """An answer may be empty (eos first): chat returns it in the context, and the next turn takes that context
    back, as the official chat does. Training data still needs every turn non-empty."""
    msgs = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "And now?"}]
    answer, context, _ = _chat(tiny_model, tiny_tokenizer, clock, msgs=msgs, sampling=False, num_beams=1)
    assert context == msgs + [{"role": "assistant", "content": answer}]
    with pytest.raises(InvalidInputError, match=r"msgs\[1\] \(assistant\) has empty content"):
        validate_conversation(msgs, for_training=True)


def test_slicing_settings_changed_between_calls_apply_to_the_next(tiny_checkpoint_fp32, tiny_tokenizer):
    """The official chat reads the config at each call: a max_slice_nums set after a first call is used by the
    next one (its answer is the answer of a model configured so from the start)."""
    from axolotl_minicpmv import MiniCPMV

    picture = Image.open(EXAMPLES / "images" / "landscape.jpg").convert("RGB")  # 1344x896: sliced at 9, not at 1
    settings = dict(sampling=False, num_beams=1, max_new_tokens=12)
    model, fresh = (MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval() for _ in range(2))
    sliced = _chat(model, tiny_tokenizer, picture, **settings)[0]
    model.config.max_slice_nums = fresh.config.max_slice_nums = 1
    unsliced = _chat(fresh, tiny_tokenizer, picture, **settings)[0]
    assert unsliced != sliced  # else this test could not tell
    assert _chat(model, tiny_tokenizer, picture, **settings)[0] == unsliced


def test_chat_needs_the_tokenizer(tiny_model, clock):
    with pytest.raises(ValueError, match="tokenizer"):
        tiny_model.chat(image=clock, msgs=MSGS, context=None, tokenizer=None)


def test_bad_messages_are_refused(tiny_model, tiny_tokenizer, clock):
    with pytest.raises(InvalidInputError, match="first message"):
        _chat(tiny_model, tiny_tokenizer, clock, msgs=[{"role": "assistant", "content": "Hi"}])
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        _chat(tiny_model, tiny_tokenizer, clock, msgs="[{broken")


def test_prompt_longer_than_max_inp_length_is_refused(tiny_model, tiny_tokenizer, clock):
    # the clock image alone takes 66 tokens (<image> + 64 + </image>)
    with pytest.raises(InvalidInputError, match="max_inp_length=50"):
        _chat(tiny_model, tiny_tokenizer, clock, max_inp_length=50)


# ---------------------------------------------------------------- greedy decoding pinned


def _manual_greedy(model, tokenizer, image, msgs, max_new_tokens, repetition_penalty):
    """Argmax decoding by hand: full forward each step, no cache; the repetition penalty (HF rule:
    positive scores divided, negative multiplied) applies to the generated tokens only, as in the
    official chat (the prompt is given as embeddings)."""
    processor = MiniCPMVProcessor.from_config(tokenizer, model.config)
    ids = processor.encode_prompt(processor.chat_prompt(msgs, image)).unsqueeze(0)
    pixels, order = group_by_size(processor.pixel_values(image))
    bound = image_bounds(ids, tokenizer.im_start_id, tokenizer.im_end_id)
    generated = []
    with torch.no_grad():
        prompt_embeds = model.embed_inputs(ids, pixels, order, bound)
        for _ in range(max_new_tokens):
            new = model.get_input_embeddings()(torch.tensor([generated], dtype=torch.long)) * model.config.scale_emb
            scores = model(inputs_embeds=torch.cat([prompt_embeds, new], dim=1)).logits[0, -1].double()
            for token in set(generated):
                scores[token] = scores[token] / repetition_penalty if scores[token] > 0 else scores[token] * repetition_penalty
            token = int(scores.argmax())
            generated.append(token)
            if token == tokenizer.eos_token_id:
                break
    return generated


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.2])
def test_greedy_equals_manual_argmax_decoding(tiny_model, tiny_tokenizer, clock, repetition_penalty):
    steps = 12
    generated = _manual_greedy(tiny_model, tiny_tokenizer, clock, MSGS, steps, repetition_penalty)
    answer, _, config = _chat(
        tiny_model, tiny_tokenizer, clock, sampling=False, num_beams=1, repetition_penalty=repetition_penalty, max_new_tokens=steps
    )
    assert config == {"num_beams": 1, "repetition_penalty": repetition_penalty}
    # decoding rule written out: drop 0s, one trailing eos; what is left is decoded and stripped
    kept = [t for t in generated if t != 0]
    if kept and kept[-1] == tiny_tokenizer.eos_token_id:
        kept = kept[:-1]
    assert answer == tiny_tokenizer.decode(kept).strip()
    assert answer, "the tiny model produced text to compare"


# ---------------------------------------------------------------- decoding the answer


@pytest.mark.parametrize(
    "ids, kept",
    [
        ([1, 0, 300, 0, 301, 2], [300, 301]),  # 0s anywhere, one bos, one eos
        ([1, 1, 300, 2, 2], [1, 300, 2]),  # only one leading bos and one trailing eos
        ([300, 1, 301], [300, 1, 301]),  # bos/eos in the middle stay
        ([0, 0, 1, 300], [300]),  # zeros go first, so the bos behind them is leading
        ([300, 2, 0, 0], [300]),
        ([0, 0], []),
        ([1, 2], []),
    ],
)
def test_decode_answer_rule(tiny_tokenizer, ids, kept):
    assert decode_answer(torch.tensor(ids), tiny_tokenizer) == tiny_tokenizer.decode(kept).strip()


def test_decode_answer_keeps_other_special_pieces_as_text_and_strips(tiny_tokenizer):
    ids = tiny_tokenizer.encode("  <box>12 34</box> done  ", add_special_tokens=False)
    text = decode_answer(torch.tensor([1] + ids + [2]), tiny_tokenizer)
    assert "<box>" in text and "</box>" in text
    assert text == text.strip() and text.endswith("done")


# ---------------------------------------------------------------- MiniCPMVChat (the seed's helper)


@pytest.fixture(scope="module")
def session(tiny_checkpoint):
    return MiniCPMVChat(str(tiny_checkpoint))


def test_img2base64_round_trip():
    assert base64.b64decode(img2base64(CLOCK)) == CLOCK.read_bytes()


def test_session_picks_float32_on_cpu(session):
    expected_device = pick_device()
    if torch.cuda.is_available():
        assert expected_device == "cuda"
    else:
        assert expected_device in ("cpu", "mps")
    if expected_device == "cpu":
        assert session.device == "cpu"
        assert session.dtype == torch.float32
        assert {p.dtype for p in session.model.parameters()} == {torch.float32}
        assert {p.device.type for p in session.model.parameters()} == {"cpu"}
    assert not session.model.training


def test_session_chat_with_base64_image_and_json_question(session):
    msgs = [{"role": "user", "content": "What time is it?"}]
    answer = session.chat({"image": img2base64(CLOCK), "question": json.dumps(msgs)}, max_new_tokens=6)
    assert isinstance(answer, str)
    beam = session.chat({"image": img2base64(CLOCK), "question": json.dumps(msgs)}, sampling=False, max_new_tokens=6)
    assert beam == session.chat({"image": img2base64(CLOCK), "question": json.dumps(msgs)}, sampling=False, max_new_tokens=6)


def test_session_chat_without_image(session):
    answer = session.chat({"image": None, "question": json.dumps([{"role": "user", "content": "Hi"}])}, sampling=False, max_new_tokens=4)
    assert isinstance(answer, str)
    answer = session.chat({"question": json.dumps([{"role": "user", "content": "Hi"}])}, sampling=False, max_new_tokens=4)
    assert isinstance(answer, str)


def test_session_dtype_and_device_overrides(tiny_checkpoint):
    session = MiniCPMVChat(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    assert session.device == "cpu" and session.dtype == torch.bfloat16
    assert {p.dtype for p in session.model.parameters()} == {torch.bfloat16}
    msgs = json.dumps([{"role": "user", "content": "What time is it?"}])
    assert isinstance(session.chat({"image": img2base64(CLOCK), "question": msgs}, sampling=False, max_new_tokens=4), str)
    session = MiniCPMVChat(str(tiny_checkpoint), device="cpu", dtype=torch.float64)
    assert {p.dtype for p in session.model.parameters()} == {torch.float64}
    with pytest.raises(ValueError, match="dtype 'bf16' is not supported; choose one of bfloat16, float16, float32"):
        MiniCPMVChat(str(tiny_checkpoint), device="cpu", dtype="bf16")
    with pytest.raises(ValueError, match="device 'gpu0'"):
        MiniCPMVChat(str(tiny_checkpoint), device="gpu0")


def test_session_invalid_base64(session):
    with pytest.raises(InvalidInputError, match=r"input\['image'\]: not an existing file and not valid base64"):
        session.chat({"image": "%%% not base64 %%%", "question": json.dumps(MSGS)})


def test_session_corrupt_image(session):
    corrupt = base64.b64encode(CLOCK.read_bytes()[:300]).decode("ascii")
    with pytest.raises(InvalidInputError, match=r"input\['image'\]: cannot decode image data"):
        session.chat({"image": corrupt, "question": json.dumps(MSGS)})
    garbage = base64.b64encode(b"hello world, no pixels here").decode("ascii")
    with pytest.raises(InvalidInputError, match=r"input\['image'\]: cannot decode image data"):
        session.chat({"image": garbage, "question": json.dumps(MSGS)})


def test_session_missing_or_bad_question(session):
    with pytest.raises(InvalidInputError, match="'question'"):
        session.chat({"image": img2base64(CLOCK)})
    with pytest.raises(InvalidInputError, match="'question'"):
        session.chat("What time is it?")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        session.chat({"image": None, "question": "What time is it?"})


def test_session_with_a_missing_adapter(tiny_checkpoint, tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(ValueError, match="does not exist") as err:
        MiniCPMVChat(str(tiny_checkpoint), adapter=str(missing))
    assert str(missing) in str(err.value)


def test_image_markers_in_an_earlier_answer_stay_text(tiny_model, tiny_tokenizer):
    """An answer may contain `</image>` or `<image>` as text; the next turn still pairs the image's own slots."""
    from conftest import EXAMPLES
    from PIL import Image

    image = Image.open(EXAMPLES / "images" / "clock.jpg")
    msgs = [
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "A clock</image> and <image>"},
        {"role": "user", "content": "Sure?"},
    ]
    answer, context, _ = tiny_model.chat(image=image, msgs=msgs, tokenizer=tiny_tokenizer, sampling=False, max_new_tokens=4)
    assert isinstance(answer, str) and context[:3] == msgs


@pytest.mark.parametrize(("size", "images"), [((1344, 896), 7), ((448, 448), 1)])
def test_chat_image_features_equal_the_batched_features(tiny_model, tiny_tokenizer, size, images):
    """chat() resizes the source in a thread while the cells go through the tower: same features, same order."""
    generator = torch.Generator().manual_seed(size[0])
    image = Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy())
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    with torch.inference_mode():
        overlapped = image_features(tiny_model, image, processor, tiny_model.encode_images)
        batched = tiny_model.get_image_features(*group_by_size(processor.pixel_values(image)))
    assert overlapped.shape == (images, tiny_model.config.query_num, tiny_model.config.hidden_size)
    assert torch.equal(overlapped, batched)
