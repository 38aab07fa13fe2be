"""Answer metrics (inference/metrics.py) against hand-computed values and the published examples:
the ST-VQA / DocVQA ANLS table (answers "Coca Cola" / "Coca Cola Company") and VQAv2's accuracy
(min(#humans / 3, 1) averaged over the 10 leave-one-out subsets of 10 human answers)."""

from __future__ import annotations

import pytest

from axolotl_minicpmv.inference.metrics import (
    anls,
    exact,
    levenshtein,
    normalize_answer,
    parse_metrics,
    rouge_l,
    score,
    vqa,
    vqa_normalize,
)

# ------------------------------------------------------------------ exact


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("The cat.", "cat"), ("  Two  dogs!", "2 dogs"), ("an APPLE", "apple"), ("It's red", "its red"), ("Ten", "10")],
)
def test_exact_normalises_case_punctuation_articles_numbers_and_spaces(prediction, reference):
    assert exact(prediction, [reference]) == 1.0


def test_exact_is_the_best_over_references_and_zero_otherwise():
    assert exact("blue", ["red", "Blue."]) == 1.0
    assert exact("blue car", ["blue"]) == 0.0
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"


# ------------------------------------------------------------------ vqa


def test_vqa_normalisation_follows_the_official_script():
    assert vqa_normalize("Two") == "2"
    assert vqa_normalize("the dog.") == "dog"
    assert vqa_normalize("dont know") == "don't know"
    assert vqa_normalize("1,000") == "1000"  # a 1,000-style number: punctuation removed, not spaced
    assert vqa_normalize("yes!") == "yes"
    assert vqa_normalize("black/white") == "black white"  # not next to a space: becomes a space
    assert vqa_normalize("3.5") == "3.5"  # a period before a digit stays
    assert vqa_normalize("Red\tcar\n") == "red car"


@pytest.mark.parametrize(("humans", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_ten_human_answers(humans, expected):
    # Leaving out one of n matching answers leaves n-1 of 9, another leaves n: mean of min(k/3, 1).
    # 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9; 1 of 10: 9 * (1/3) / 10 = 0.3.
    references = ["red"] * humans + ["blue"] * (10 - humans)
    assert vqa("Red.", references) == pytest.approx(expected)


def test_vqa_with_one_reference_is_normalised_exact_match():
    assert vqa("Two", ["2"]) == 1.0
    assert vqa("three", ["2"]) == 0.0


# ------------------------------------------------------------------ anls


def test_levenshtein_hand_computed():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


@pytest.mark.parametrize(
    ("output", "expected"),
    # the published ST-VQA / DocVQA example (Robust Reading Competition, task "Evaluation Metric")
    [("The Coca", 0.0), ("CocaCola", 0.89), ("Coca cola", 1.0), ("Cola", 0.0), ("Cat", 0.0)],
)
def test_anls_published_example(output, expected):
    assert anls(output, ["Coca Cola", "Coca Cola Company"]) == pytest.approx(expected, abs=0.005)


def test_anls_threshold_and_hand_computed_values():
    assert anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # NL 0.43 < 0.5: kept
    assert anls("ab", ["cd"]) == 0.0  # NL 1
    assert anls("abcd", ["abxy"]) == 0.0  # NL exactly 0.5: not below the threshold
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)  # NL 0.4
    assert anls("  HELLO ", ["hello"]) == 1.0  # case and surrounding spaces do not count


# ------------------------------------------------------------------ rouge_l


def test_rouge_l_f_measure_hand_computed():
    # LCS of "the cat on the mat" in "the cat sat on the mat" is 5 tokens: P = 5/5, R = 5/6, F = 10/11
    assert rouge_l("the cat on the mat", ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    # LCS "a c" = 2: P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c", ["a c d e"]) == pytest.approx(4 / 7)
    assert rouge_l("Red.", ["red"]) == 1.0
    assert rouge_l("green", ["red"]) == 0.0


def test_rouge_l_counts_chinese_characters():
    # rouge_score's own tokenizer drops non-ASCII text; ours makes each character a token: LCS 2, P = 2/2, R = 2/3
    assert rouge_l("红色", ["红色的"]) == pytest.approx(0.8)


def test_score_and_metric_names():
    assert score("Two", "2", ["exact", "vqa", "anls", "rouge_l"]) == {"exact": 1.0, "vqa": 1.0, "anls": 0.0, "rouge_l": 0.0}
    assert parse_metrics("exact, rouge_l") == ["exact", "rouge_l"]
    assert parse_metrics(None) == ["exact", "vqa", "anls", "rouge_l"]
    with pytest.raises(ValueError, match="unknown metric.*bleu.*choose from exact, vqa, anls, rouge_l"):
        parse_metrics("exact,bleu")
