"""Answer metrics for `minicpmv-predict` and `minicpmv_eval_generate`: exact, vqa, anls, rouge_l.

Each must match its published definition: `vqa` the VQAv2 evaluation script's answer normalisation and its
accuracy (min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the references), `anls`
DocVQA / ST-VQA's average normalised Levenshtein similarity with threshold 0.5, `rouge_l` the LCS F-measure
of the `rouge_score` package (offline; with a tokenizer that keeps non-Latin text). tests/test_metrics.py
holds hand-computed values, including the published VQA and ANLS examples. Every metric takes one
prediction and a list of references and returns a float in [0, 1] (the best over references, except `vqa`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

METRICS = ("exact", "vqa", "anls", "rouge_l")
DEFAULT_METRICS = METRICS
ANLS_THRESHOLD = 0.5

# ------------------------------------------------------------------ normalisation

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """`exact`'s normalisation: lower case, punctuation deleted ("it's" -> "its"), articles dropped, number words
    as digits, whitespace collapsed (SQuAD's rule plus VQA's number words)."""
    text = "".join("" if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in text.lower())
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in ARTICLES)


def exact(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(ref) for ref in references))


# The VQA evaluation script's tables (Antol et al. 2015; github.com/GT-Vision-Lab/VQA, vqaEval.py), written out
# here. Contractions restore the apostrophe that annotators left out ("dont" -> "don't").
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
VQA_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The script's pattern is "(?!<=\d)(\.)(?!\d)", whose first part is a (vacuous) look-ahead: in effect, every
# period not followed by a digit goes. Its `sub(..., re.UNICODE)` passes 32 as the count: at most 32 go.
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_normalize(text: str) -> str:
    """The VQA script's normalisation: punctuation, then number words, articles and contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in VQA_PUNCTUATION:
        # removed when it touches a space (or the answer has a 1,000-style number), else turned into a space
        if p + " " in text or " " + p in text or _COMMA_BETWEEN_DIGITS.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=32)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [VQA_CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def vqa(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy. With one reference: normalised exact match. With several (VQAv2 has 10 human answers): the
    mean over the leave-one-out subsets of min(#matching answers in the subset / 3, 1), as the official script."""
    answer = vqa_normalize(prediction)
    refs = [vqa_normalize(ref) for ref in references]
    if len(refs) == 1:
        return float(answer == refs[0])
    matches = sum(ref == answer for ref in refs)
    # leaving out a matching reference leaves matches-1 in the subset, leaving out another one leaves matches
    per_subset = [min(1.0, (matches - (ref == answer)) / 3) for ref in refs]
    return sum(per_subset) / len(per_subset)


# ------------------------------------------------------------------ ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    # DocVQA's evaluation: lower case, surrounding and repeated whitespace removed
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """max over references of 1 - NL, where NL = levenshtein / max(len); 0 when NL >= threshold."""
    answer = _anls_text(prediction)
    best = 0.0
    for ref in references:
        ref = _anls_text(ref)
        longest = max(len(answer), len(ref))
        nl = levenshtein(answer, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ------------------------------------------------------------------ ROUGE-L

_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")


class _Tokenizer:
    """rouge_score's default tokenizer keeps only [a-z0-9] (Chinese answers would score 0): words of any script,
    lower-cased, punctuation dropped, and each CJK character a token of its own."""

    def tokenize(self, text: str) -> list[str]:
        text = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in text.lower())
        return _CJK.sub(r" \1 ", text).split()


_SCORER = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), the best over references."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_Tokenizer())
    return max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


METRIC_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], float]] = {"exact": exact, "vqa": vqa, "anls": anls, "rouge_l": rouge_l}


def parse_metrics(spec: str | Sequence[str] | None) -> list[str]:
    """`"exact,vqa"` (or a list) -> checked metric names, in the given order; None -> all of them."""
    if spec is None:
        return list(DEFAULT_METRICS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in METRIC_FUNCTIONS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or spec!r}; choose from {', '.join(METRICS)} (comma-separated)")
    return names


def score(prediction: str, references: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """{metric: value} for one prediction."""
    if isinstance(references, str):
        references = [references]
    return {name: round(METRIC_FUNCTIONS[name](prediction, references), 6) for name in metrics}
