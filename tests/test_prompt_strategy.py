"""Prompt strategy `axolotl_minicpmv.minicpmv_chat`: ids, placeholder layouts and label masks equal to
the official fine-tuning rule, over-long samples dropped (never truncated) inside Axolotl's pipeline."""

from __future__ import annotations

import logging

import pytest
from fixtures_data import DATASET_TYPE, EXAMPLES, PH, conv, images, load_prepared, make_cfg, prepared_examples, write_json  # noqa: F401

from axolotl_minicpmv.integration.data import normalize_sample, prepare_minicpmv_datasets
from axolotl_minicpmv.integration.prompt_strategy import MiniCPMVChatDatasetStrategy, MiniCPMVChatStrategy
from axolotl_minicpmv.model.image_processing_minicpmv import MiniCPMVImageProcessor
from axolotl_minicpmv.model.processing_minicpmv import InvalidInputError, MiniCPMVProcessor

X = -100
BOS, EOS, IM_START, IM_END, SLICE_START, SLICE_END = 1, 2, 101, 102, 111, 112
USER, AI = [658, 113], [658, 114]  # "<用户>", "<AI>" after dropping bos, with the tiny tokenizer
PH_IDS = [IM_START] + [0] * 64 + [IM_END]
NEWLINE = [658, 125]  # "\n" as a chunk of its own
WHAT = [421, 380, 382, 374, 408, 683]  # "What is in the image?"
NL_WHAT = [658, 125, 414, 380, 382, 374, 408, 683]  # "\nWhat is in the image?"
CAT_EOS = [461, 559, 671, EOS]  # "A cat.</s>"


@pytest.fixture(scope="module")
def strategy(tiny_tokenizer):
    return MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=4096)


def prepared_row(sample, base_dir=EXAMPLES):
    """What the strategy receives: a sample validated and normalised by data.py."""
    return normalize_sample({"id": "t", **sample}, 0, base_dir)


def tokenize(strategy, sample, base_dir=EXAMPLES):
    row = strategy.tokenize_prompt(prepared_row(sample, base_dir))
    assert row["attention_mask"] == [1] * len(row["input_ids"]) and len(row["labels"]) == len(row["input_ids"])
    return row


def enc(tokenizer, text):
    return tokenizer.encode(text)[1:]


def official_style(tokenizer, conversations):
    """The official recipe, re-derived in test code: ids and its PRE-SHIFTED target (target[i-1] = token i).

    Each role marker and message encoded alone with `encode(x)[1:]`, `</s>` appended to the last message;
    context 0 = assistant message tokens; target[i-1] = ids[i] where context[i] == 0, and eos where an
    assistant message ends (context[i] == 1 after context[i-1] == 0).
    """
    ids, context = [], []
    for i, msg in enumerate(conversations):
        marker = enc(tokenizer, "<用户>" if msg["role"] == "user" else "<AI>")
        text = enc(tokenizer, msg["content"] + ("</s>" if i == len(conversations) - 1 else ""))
        ids += marker + text
        context += [1] * len(marker) + [0 if msg["role"] == "assistant" else 1] * len(text)
    target = [X] * len(ids)
    for i in range(1, len(ids)):
        if context[i] == 0:
            target[i - 1] = ids[i]
        if context[i] == 1 and context[i - 1] == 0:
            target[i - 1] = tokenizer.eos_id
    return ids, target


# ---------------------------------------------------------------- hand-checked layouts and masks


def test_text_only_single_turn(strategy):
    row = tokenize(strategy, {"conversations": conv("What is in the image?", "A cat.")})
    assert row["input_ids"] == [*USER, *WHAT, *AI, *CAT_EOS]
    assert row["labels"] == [X] * 10 + CAT_EOS  # the answer and its </s>; nothing else
    assert row["image"] == [] and row["image_sizes"] == []


def test_multi_turn_predicts_eos_after_every_assistant_turn(strategy, tiny_tokenizer):
    describe, answer = [495, 374, 408, 671], [393, 589, 380, 419, 390, 671, EOS]  # "Describe the image.", "The answer is yes.</s>"
    row = tokenize(strategy, {"conversations": conv("Describe the image.", "A cat.", "What is in the image?", "The answer is yes.")})
    assert row["input_ids"] == [*USER, *describe, *AI, *CAT_EOS[:-1], *USER, *WHAT, *AI, *answer]
    assert (
        row["labels"]
        == (
            [X] * 8  # <用户>, user text, <AI>
            + CAT_EOS[:-1]  # "A cat."
            + [EOS, X]  # the last answer token predicts eos; the rest of <用户> is input only
            + [X] * 6
            + [X, X]  # user text, <AI>
            + answer
        )
    )


def test_single_image_tag_first(strategy, images):
    row = tokenize(strategy, {"image": str(images["small"]), "conversations": conv("<image>\nWhat is in the image?", "A cat.")})
    assert row["input_ids"] == [*USER, *PH_IDS, *NL_WHAT, *AI, *CAT_EOS]
    assert row["labels"] == [X] * (2 + 66 + 8 + 2) + CAT_EOS  # image slots never supervised
    assert row["image"] == [str(images["small"].resolve())] and row["image_sizes"] == [[200, 150]]


def test_no_tag_puts_the_placeholder_and_a_newline_in_front(strategy, images):
    tagged = tokenize(strategy, {"image": str(images["small"]), "conversations": conv("<image>\nWhat is in the image?", "A cat.")})
    untagged = tokenize(strategy, {"image": str(images["small"]), "conversations": conv("What is in the image?", "A cat.")})
    assert untagged["input_ids"] == tagged["input_ids"] and untagged["labels"] == tagged["labels"]


def test_tag_mid_text(strategy, tiny_tokenizer, images):
    row = tokenize(strategy, {"image": str(images["small"]), "conversations": conv("Look: <image>\nWhat is in the image?", "A cat.")})
    look = enc(tiny_tokenizer, "Look: ")
    assert row["input_ids"] == [*USER, *look, *PH_IDS, *NL_WHAT, *AI, *CAT_EOS]
    assert row["input_ids"].index(IM_START) == 2 + len(look)
    assert row["labels"] == [X] * (len(row["input_ids"]) - 4) + CAT_EOS


def test_sliced_images_in_several_user_turns(strategy, tiny_tokenizer, images):
    # grid 896x896 -> 2 x 2 slices; wide 1200x300 -> 3 x 1; tags in the first and the second user turn
    sample = {
        "image": [str(images["grid"]), str(images["wide"])],
        "conversations": conv("<image>\nDescribe the image.", "A cat.", "And this one? <image>", "The answer is no."),
    }
    row = tokenize(strategy, sample)
    grid = PH_IDS + [SLICE_START] + PH_IDS * 2 + NEWLINE + PH_IDS * 2 + [SLICE_END]
    wide = PH_IDS + [SLICE_START] + PH_IDS * 3 + [SLICE_END]
    first = grid + enc(tiny_tokenizer, "\nDescribe the image.")
    second = enc(tiny_tokenizer, "And this one? ") + wide
    answer = enc(tiny_tokenizer, "The answer is no.</s>")
    assert row["input_ids"] == [*USER, *first, *AI, *CAT_EOS[:-1], *USER, *second, *AI, *answer]
    assert row["input_ids"].count(IM_START) == row["input_ids"].count(IM_END) == 5 + 4
    supervised = [label for label in row["labels"] if label != X]
    assert supervised == CAT_EOS[:-1] + [EOS] + answer
    assert row["image_sizes"] == [[896, 896], [1200, 300]]
    # the placeholder texts are the processor's, laid out from the header size alone
    processor = MiniCPMVProcessor(MiniCPMVImageProcessor(), tiny_tokenizer)
    assert processor.image_placeholder((896, 896)) == PH + "<slice>" + PH * 2 + "\n" + PH * 2 + "</slice>"
    assert processor.image_placeholder((1200, 300)) == PH + "<slice>" + PH * 3 + "</slice>"


def test_max_slice_nums_changes_the_layout(tiny_tokenizer, images):
    sample = {"image": str(images["grid"]), "conversations": conv("<image>", "A cat.")}
    row = MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=4096, max_slice_nums=1).tokenize_prompt(prepared_row(sample))
    assert row["input_ids"].count(IM_START) == 1  # max_slice_nums 1: the source image only


# ---------------------------------------------------------------- equivalence with the official rule


def test_ids_and_labels_equal_the_official_rule_on_the_examples(tiny_tokenizer, prepared_examples):
    """Every example sample the official code can express (one image, tag in the first turn or none;
    text-only): same ids (no bos, like the official June-2024 code) and labels = the official
    pre-shifted target shifted right by one."""
    import json

    strategy = MiniCPMVChatStrategy(tiny_tokenizer, sequence_len=4096)
    processor = MiniCPMVProcessor(MiniCPMVImageProcessor(), tiny_tokenizer)
    raw = {s["id"]: s for s in json.loads((EXAMPLES / "train.json").read_text()) + json.loads((EXAMPLES / "eval.json").read_text())}
    prepared = [r for ds in (prepared_examples.datasets[0], prepared_examples.test_datasets[0]) for r in load_prepared(ds)]
    checked = 0
    for prepared_row_ in prepared:
        sample = raw[prepared_row_["id"]]
        image = sample.get("image")
        if isinstance(image, list) or (image and any("<image>" in m["content"] for m in sample["conversations"][1:])):
            continue  # several images, or a tag in a later turn: our extensions, no official counterpart
        conversations = [dict(m) for m in sample["conversations"]]
        if image:  # the official placement rule
            placeholder = processor.image_placeholder(tuple(prepared_row_["image_sizes"][0]))
            first = conversations[0]["content"]
            conversations[0]["content"] = first.replace("<image>", placeholder) if "<image>" in first else placeholder + "\n" + first
        ids, target = official_style(tiny_tokenizer, conversations)
        row = strategy.tokenize_prompt(prepared_row_)
        assert row["input_ids"] == ids, sample["id"]
        # unshifted: labels[i] = what position i-1 predicts = target[i-1]; -100 at 0
        assert row["labels"] == [X] + target[:-1], sample["id"]
        assert sum(label == EOS for label in row["labels"]) == sum(m["role"] == "assistant" for m in conversations)
        checked += 1
    assert checked >= 12


# ---------------------------------------------------------------- inside Axolotl's pipeline


def _wrapped(cfg, ds_cfg, tokenizer):
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.data.wrappers import get_dataset_wrapper

    dataset = load_dataset_with_config(ds_cfg, use_auth_token=False)
    wrapped, _ = get_dataset_wrapper(ds_cfg, tokenizer, cfg, ds_cfg.type, dataset)
    return wrapped


def test_axolotl_loads_the_strategy_by_its_type_name(prepared_examples, tiny_tokenizer):
    from axolotl.prompt_strategies import load

    loaded = load(DATASET_TYPE, tiny_tokenizer, prepared_examples, prepared_examples.datasets[0])
    assert isinstance(loaded, MiniCPMVChatDatasetStrategy) and isinstance(loaded.strategy, MiniCPMVChatStrategy)


@pytest.mark.parametrize("excess_length_strategy", ["drop", "truncate"])
def test_over_long_samples_are_dropped_never_truncated(prepared_examples, tiny_tokenizer, caplog, excess_length_strategy):
    from axolotl.utils.data.utils import handle_long_seq_in_dataset

    cfg = prepared_examples
    ds_cfg = cfg.datasets[0]
    full = {r["id"]: r for r in _wrapped(cfg.copy(), ds_cfg, tiny_tokenizer)}  # sequence_len 2048 keeps all
    limit = 600
    too_long = sorted(i for i, r in full.items() if len(r["input_ids"]) > limit)
    assert too_long and len(too_long) < len(full)

    short_cfg = cfg.copy()
    short_cfg.update(sequence_len=limit, excess_length_strategy=excess_length_strategy)
    with caplog.at_level(logging.WARNING):
        dataset = handle_long_seq_in_dataset(_wrapped(short_cfg, ds_cfg, tiny_tokenizer), limit, short_cfg)
    kept = {r["id"]: r for r in dataset}
    assert sorted(set(full) - set(kept)) == too_long
    for sample_id, row in kept.items():  # untouched: same ids, labels, image columns
        assert row == full[sample_id]
    for sample_id in too_long:
        n = len(full[sample_id]["input_ids"])
        assert f"dropping sample {sample_id!r}: {n} tokens (image placeholders included) > sequence_len {limit}" in caplog.text
    assert f"dropped {len(too_long)} of {len(full)} samples longer than sequence_len {limit}" in caplog.text


def test_over_long_with_excess_length_strategy_raise_names_the_samples(prepared_examples, tiny_tokenizer):
    cfg = prepared_examples.copy()
    cfg.update(sequence_len=600, excess_length_strategy="raise")
    with pytest.raises(
        ValueError,
        match=r"4 samples are longer than sequence_len 600 \(excess_length_strategy: raise\): \['sample-0001', 'sample-0006', 'sample-0010', 'sample-0012'\]",
    ):
        _wrapped(cfg, cfg.datasets[0], tiny_tokenizer)


def test_test_datasets_use_eval_sequence_len(prepared_examples, tiny_tokenizer):
    from axolotl_minicpmv.integration.prompt_strategy import load

    cfg = prepared_examples.copy()
    cfg.update(sequence_len=1000, eval_sequence_len=300)
    assert load(tiny_tokenizer, cfg, cfg.datasets[0]).strategy.sequence_len == 1000
    assert load(tiny_tokenizer, cfg, cfg.test_datasets[0]).strategy.sequence_len == 300


def test_rows_not_prepared_by_the_plugin_are_refused(strategy):
    with pytest.raises(InvalidInputError, match="did not go through axolotl_minicpmv.integration.data.prepare_minicpmv_datasets"):
        strategy.tokenize_prompt({"conversations": conv("q", "a")})


def test_full_axolotl_pipeline_with_val_split(tmp_path, tiny_tokenizer, images):
    """prepare -> Axolotl's prepare_datasets (tokenize, length filter, val_set_size split, cache)."""
    from axolotl.utils.data import prepare_datasets

    samples = [
        {"id": f"s{i}", "image": str(images[name]), "conversations": conv("<image>\nWhat is in the image?", "A cat.")}
        for i, name in enumerate(["small", "square", "wide", "grid"])
    ] + [{"id": "text", "conversations": conv("What is in the image?", "A cat.")}]
    cfg = make_cfg(
        tmp_path / "run",
        train=[write_json(tmp_path / "d.json", samples)],
        dataset_prepared_path=str(tmp_path / "prepared"),
        sequence_len=400,  # the 2x2 grid (5 placeholders, 330 slots) fits, nothing else is long
        val_set_size=2,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        num_epochs=1,
        batch_size=1,
        world_size=1,
        seed=0,
    )
    prepare_minicpmv_datasets(cfg)
    train, evaluation, steps, _ = prepare_datasets(cfg, tiny_tokenizer)
    assert (len(train), len(evaluation)) == (3, 2) and steps == 3
    assert set(train.column_names) == {"id", "image", "image_bytes", "image_sizes", "input_ids", "labels", "attention_mask"}
    rows = {r["id"]: r for r in list(train) + list(evaluation)}
    assert rows["s3"]["input_ids"].count(IM_START) == 5 and rows["text"]["image"] == []
