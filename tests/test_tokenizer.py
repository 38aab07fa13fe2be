"""Tokenizer: ids and text must equal transformers 4.40.2's slow LlamaTokenizer on the official layout.

Every id list and decoded string below was produced by transformers 4.40.2
`LlamaTokenizer(vocab_file, legacy=True, add_bos_token=True, additional_special_tokens=<the 12 pieces>,
unk/bos/eos "<unk>"/"<s>"/"</s>", pad "<unk>")` on the tiny tokenizer.model that
`write_tiny_tokenizer(dir, seed=0)` trains (sentencepiece 0.2.3); /work/cmp/compare_tokenizer.py re-checks
~9,000 cases against 4.40.2 directly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from axolotl_minicpmv.model.tokenization import (
    ROLE_PIECES,
    SPECIAL_PIECES,
    MiniCPMVTokenizer,
    MiniCPMVTokenizerFast,
    load_tokenizer,
    register_tokenizer,
)
from axolotl_minicpmv.testing.tiny_tokenizer import (
    official_special_tokens_map,
    official_tokenizer_config,
    vocab_fingerprint,
    write_tiny_tokenizer,
)

# sha256 over (id, piece, score, type) of the seeded tiny model: pins it, so the literals stay valid
TINY_VOCAB_FINGERPRINT = "b0a671b2d2b84e501d1228779bdb70425ea4123695bee1ad433efebfd0a0b968"

PH = "<image>" + "<unk>" * 64 + "</image>"  # one image placeholder
UNK64 = [0] * 64
SLICED_PROMPT = "<用户>" + PH + "<slice>" + PH + PH + "\n" + PH + PH + "</slice>\nWhat is in the image?<AI>"

# text -> tokenizer.encode(text), from transformers 4.40.2 (see module docstring)
ENCODE_440 = {
    SLICED_PROMPT: [1, 658, 113, 101, *UNK64, 102, 111, 101, *UNK64, 102, 101, *UNK64, 102, 658, 125,
                    101, *UNK64, 102, 101, *UNK64, 102, 112, 658, 125, 414, 380, 382, 374, 408, 683, 114],
    "<用户>" + PH + "\nDescribe the photo in detail.<AI>":
        [1, 658, 113, 101, *UNK64, 102, 658, 125, 453, 374, 402, 382, 417, 607, 522, 671, 114],
    "<用户>" + PH + "\n请描述这张图片。<AI>图中有一只猫。<用户>What colour is it?<AI>":
        [1, 658, 113, 101, *UNK64, 102, 658, 125, 707, 587, 681, 114, 579, 731, 681, 113, 414, 452, 380, 479,
         683, 114],
    "</image>\n": [1, 102, 658, 125],
    "</image>\nWhat": [1, 102, 658, 125, 414],
    "<image></image>\n\n": [1, 101, 102, 658, 125, 125],
    "\n": [1, 658, 125],
    "a\nb": [1, 375, 125, 675],
    "请描述这张图片。": [1, 465, 587, 681],
    "图片里有什么？ 这是一张照片": [1, 482, 716, 690, 516, 734, 568, 549],
    "  double  spaces  ": [1, 658, 658, 417, 392, 525, 658, 377, 672, 496, 390, 658, 658],
    " lead space": [1, 658, 658, 398, 497, 377, 672, 496, 659],
    "trailing space ": [1, 371, 667, 522, 386, 377, 672, 496, 659, 658],
    "   ": [1, 658, 658, 658, 658],
    "": [1],
    "answer</s>": [1, 589, 2],
    "The answer is yes.</s>": [1, 393, 589, 380, 419, 390, 671, 2],
    "x<s>y": [1, 658, 695, 1, 419],
    "a<unk>b": [1, 375, 0, 387],
    "emoji 😀 and ünïcödé ≥ ∑ 漢字外": [1, 630, 677, 664, 721, 661, 658, 355, 274, 267, 243, 415, 658, 310, 303,
                                      665, 310, 290, 673, 310, 297, 669, 310, 284, 658, 341, 252, 280, 658, 341,
                                      251, 260, 658, 345, 303, 277, 344, 288, 266, 344, 279, 265],
    "Ωμέγα ☃ ж": [1, 658, 321, 284, 321, 303, 321, 288, 321, 294, 321, 292, 658, 341, 267, 246, 658, 323, 297],
    "<用户>": [1, 658, 113],
    "<用户><AI>": [1, 658, 113, 114],
    "<用户> hi": [1, 658, 113, 658, 395],
    "<ref>cat</ref><box>10 20 30 40</box>": [1, 103, 559, 104, 105, 658, 708, 699, 658, 700, 699, 658, 693, 699,
                                              658, 718, 699, 106],
    "<quad>1</quad><point>2 3</point>": [1, 107, 658, 708, 108, 109, 658, 700, 658, 693, 110],
    "12345 678": [1, 658, 708, 700, 693, 718, 168, 658, 736, 170, 737],
    "tab\there": [1, 448, 675, 124, 372, 376],
    "<image> spaced </image>": [1, 101, 658, 377, 672, 496, 659, 669, 658, 102],
    "▁under▁score": [1, 658, 658, 676, 396, 403, 377, 604, 376],
    "<reserved_3>": [1, 658, 175, 376, 666, 403, 513, 669, 210, 693, 177],
    "line1\r\nline2": [1, 429, 381, 659, 708, 128, 125, 668, 381, 659, 700],
    "<AI>answer</s><用户>next": [1, 658, 114, 454, 666, 674, 403, 2, 658, 113, 665, 530],
}  # fmt: skip

# official fine-tuning encodes role markers and messages one by one: tokenizer.encode(segment)[1:]
SEGMENTS_440 = {
    "<用户>": [658, 113],
    "<AI>": [658, 114],
    "Describe it.": [495, 479, 671],
    " lead space": [658, 658, 398, 497, 377, 672, 496, 659],
    "answer</s>": [589, 2],
    "图中有一只猫。": [658, 579, 731, 681],
    PH + "\nWhat is this?": [101, *UNK64, 102, 658, 125, 414, 380, 435, 683],
    "Yes.</s>": [629, 390, 671, 2],
    "colour  photo ": [452, 658, 402, 658],
}


def _bytes(text: str) -> list[int]:
    return [115 + b for b in text.encode("utf-8")]  # byte pieces <0x00>.. start at id 115


# ids -> (decode(ids), decode(ids, skip_special_tokens=True)), from transformers 4.40.2
DECODE_440 = [
    (ENCODE_440["emoji 😀 and ünïcödé ≥ ∑ 漢字外"], "<s>emoji 😀 and ünïcödé ≥ ∑ 漢字外", "emoji 😀 and ünïcödé ≥ ∑ 漢字外"),
    (_bytes("😀"), "😀", "😀"),
    (_bytes("😀")[:2], "\ufffd\ufffd", "\ufffd\ufffd"),  # truncated utf-8: one U+FFFD per byte
    ([658, *_bytes("漢"), 402, *_bytes("ж")[:1], 2], " 漢 photo\ufffd</s>", "漢 photo\ufffd"),
    ([1, 629, 390, 101, 439, 664, 102, 658, 378, 680], "<s> Yes<image> no</image> ok", "Yes no  ok"),
    ([1, 393, 589, 380, 419, 390, 671, 2], "<s> The answer is yes.</s>", "The answer is yes."),
    ([1, 101, 102, 658, 125, 414, 380, 435, 683], "<s><image></image>\nWhat is this?", "\nWhat is this?"),
    ([1, 465, 587, 681], "<s>请描述这张图片。", "请描述这张图片。"),
    ([1, 658, 113, 414, 452, 380, 479, 683, 114], "<s><用户>What colour is it?<AI>", "<用户>What colour is it?<AI>"),
]  # fmt: skip

# config.json of an official checkpoint, reduced to what tokenizer loading reads
OFFICIAL_CONFIG = {
    "architectures": ["MiniCPMV"],
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
    "model_type": "minicpmv",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def _official_checkpoint_dir(src, dst):
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return dst


# ----------------------------------------------------------------------------- the tiny model


def test_tiny_tokenizer_is_deterministic(tiny_dir, tmp_path):
    again = write_tiny_tokenizer(tmp_path / "again", seed=0)
    assert (again / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    assert vocab_fingerprint(tiny_dir / "tokenizer.model") == TINY_VOCAB_FINGERPRINT


def test_tiny_tokenizer_has_the_official_layout(tiny_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    assert 300 <= sp.get_piece_size() <= 1000
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert all(sp.is_control(i) for i in range(3, 101))
    assert [sp.id_to_piece(i) for i in range(101, 113)] == list(SPECIAL_PIECES)
    for piece in ROLE_PIECES:  # single pieces
        assert sp.piece_to_id(piece) != 0
        assert sp.encode(piece, out_type=str)[-1] == piece
    assert sp.encode("😀", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback
    assert json.loads((tiny_dir / "tokenizer_config.json").read_text()) == official_tokenizer_config()
    assert json.loads((tiny_dir / "special_tokens_map.json").read_text()) == official_special_tokens_map()
    config = official_tokenizer_config()
    assert config["tokenizer_class"] == "LlamaTokenizerWrapper" and config["legacy"] is True
    assert config["add_bos_token"] is True and config["pad_token"] == "<unk>"


# ----------------------------------------------------------------------------- ids and text


def test_special_ids_and_attributes(tok):
    assert isinstance(tok, MiniCPMVTokenizer)
    assert tok.convert_tokens_to_ids(list(SPECIAL_PIECES)) == list(range(101, 113))
    assert (tok.im_start, tok.im_end, tok.slice_start, tok.slice_end) == ("<image>", "</image>", "<slice>", "</slice>")
    assert (tok.im_start_id, tok.im_end_id, tok.slice_start_id, tok.slice_end_id) == (101, 102, 111, 112)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert (tok.unk_token, tok.pad_token, tok.padding_side) == ("<unk>", "<unk>", "right")
    assert len(tok) == tok.vocab_size == 800
    # role markers are ordinary text, not special tokens
    assert not set(ROLE_PIECES) & set(tok.all_special_tokens)


@pytest.mark.parametrize("text", list(ENCODE_440), ids=range(len(ENCODE_440)))
def test_encode_matches_transformers_440(tok, text):
    assert tok.encode(text) == ENCODE_440[text]
    assert tok(text)["input_ids"] == ENCODE_440[text]
    assert tok.encode(text, add_special_tokens=False) == ENCODE_440[text][1:]


def test_per_segment_encoding_matches_transformers_440(tok):
    assert {seg: tok.encode(seg)[1:] for seg in SEGMENTS_440} == SEGMENTS_440


@pytest.mark.parametrize("ids,text,text_skip", DECODE_440, ids=range(len(DECODE_440)))
def test_decode_matches_transformers_440(tok, ids, text, text_skip):
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text_skip


def test_batch_pads_right_with_unk(tok):
    batch = tok(["answer</s>", "Describe it."], padding=True)
    assert batch["input_ids"] == [[1, 589, 2, 0], [1, 495, 479, 671]]
    assert batch["attention_mask"] == [[1, 1, 1, 0], [1, 1, 1, 1]]


# ----------------------------------------------------------------------------- files and loading


def test_save_pretrained_round_trip(tok, tiny_dir, tmp_path):
    files = tok.save_pretrained(tmp_path / "saved")
    # made in a private folder and moved into place (several ranks save at once): nothing else is left
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert all(str(f).startswith(str(tmp_path / "saved")) for f in files)
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MiniCPMVTokenizer" and "auto_map" not in config
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    again = load_tokenizer(tmp_path / "saved")
    assert type(again) is MiniCPMVTokenizer
    assert {t: again.encode(t) for t in ENCODE_440} == ENCODE_440
    assert [again.decode(ids) for ids, _, _ in DECODE_440] == [text for _, text, _ in DECODE_440]
    assert again.pad_token_id == 0 and again.padding_side == "right"


def test_autotokenizer_on_official_layout_without_remote_code(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    register_tokenizer()  # idempotent; package import already did it
    official = _official_checkpoint_dir(tiny_dir, tmp_path / "official")
    for kwargs in ({}, {"trust_remote_code": False}, {"trust_remote_code": True}):
        loaded = AutoTokenizer.from_pretrained(str(official), **kwargs)
        assert type(loaded) is MiniCPMVTokenizer, kwargs
        assert loaded.encode(SLICED_PROMPT) == ENCODE_440[SLICED_PROMPT]
    # the later official class name, and a folder written by our own save_pretrained
    renamed = _official_checkpoint_dir(tiny_dir, tmp_path / "renamed")
    config = json.loads((renamed / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "MiniCPMVTokenizer"
    (renamed / "tokenizer_config.json").write_text(json.dumps(config))
    assert type(AutoTokenizer.from_pretrained(str(renamed))) is MiniCPMVTokenizer
    saved = tmp_path / "saved"
    load_tokenizer(official).save_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    assert type(AutoTokenizer.from_pretrained(str(saved))) is MiniCPMVTokenizer


def test_missing_tokenizer_files_raise_a_clear_error(tiny_dir, tmp_path):
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    shutil.copy(tiny_dir / "tokenizer_config.json", empty)
    for load in (load_tokenizer, MiniCPMVTokenizer.from_pretrained):
        with pytest.raises(FileNotFoundError) as err:
            load(empty)
        assert str(empty) in str(err.value)
        assert "tokenizer.model" in str(err.value) and "tokenizer.json" in str(err.value)


def test_tokenizer_json_only_folder_uses_the_tokenizers_route(tok, tiny_dir, tmp_path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    # a tokenizer.json as transformers 4.x converted legacy Llama models (tiny model, built here)
    vocab = {tok.sp_model.id_to_piece(i): i for i in range(tok.vocab_size)}
    scores = {p: tok.sp_model.get_score(i) for p, i in vocab.items()}
    backend = Tokenizer(BPE(vocab, generate_merges(vocab, scores), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(Regex(" "), "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_PIECES])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path / "json_only"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    fast = load_tokenizer(folder)
    assert type(fast) is MiniCPMVTokenizerFast
    assert (fast.im_start_id, fast.slice_end_id, fast.pad_token_id, fast.eos_id) == (101, 112, 0, 2)
    # without role markers its ids equal the official ones (4.40's own fast tokenizer behaves the same)
    for text, ids in ENCODE_440.items():
        if not any(role in text for role in ROLE_PIECES):
            assert fast.encode(text) == ids, text
