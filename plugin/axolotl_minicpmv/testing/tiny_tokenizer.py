"""A tiny sentencepiece tokenizer in the official MiniCPM-V 2.0 layout, for tests, the demo and benchmarks.

Same special pieces at the same ids (unk/bos/eos, reserved 3..100, the 12 placeholder pieces from 101), the
official `tokenizer_config.json` and `special_tokens_map.json`; trained deterministically on a small corpus.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import sentencepiece as spm

from ..model.tokenization import BOS, EOS, FIRST_SPECIAL_ID, ROLE_PIECES, SPECIAL_PIECES, UNK, VOCAB_FILE, _write_json

_TINY_CORPUS = """\
Describe the image in detail.
What is in the image?
What is in this photo?
Describe this photo, please.
The photo shows a red car parked in front of a small house.
A cat is sitting on a wooden table next to a cup of coffee.
What colour is the dog in the picture?
The dog is brown and white, and it is running on the grass.
Please describe the colours of the sky in this image.
The sky is blue with a few white clouds.
How many people are there in the photo?
There are three people standing near the river.
Can you read the text on the sign?
The sign says "Welcome to the city park".
What is the man holding in his hand?
He is holding a black umbrella because it is raining.
Is there a boat on the water?
Yes, there is a small boat with a yellow sail.
Where was this picture taken?
It looks like a street market in the morning.
Answer the question using a single word or phrase.
The answer is yes.
The answer is no.
What time of day is it in the image?
It is night, and the lights of the buildings are on.
Describe the colour and the shape of the object.
The object is a round green bottle on a shelf.
Find the bounding box of the bird in the image.
The bird is in the top left corner of the photo.
Count the apples on the plate: one, two, three, four, five.
There are 12 apples and 3 oranges in the basket.
The image is 448 pixels wide and 336 pixels high.
This is a photo of a mountain covered with snow.
Children are playing football in the park after school.
A woman is reading a book in the library.
The train arrives at the station at 10:30 in the morning.
Thank you! Is there anything else you would like to know?
I think the picture was taken in summer.
The colours in this photo are bright and warm.
What does the chart in the image show?
The chart shows the sales of each year from 2019 to 2023.
这是一张照片。
请描述这张图片。
图片里有什么？
图中有一只猫坐在桌子上。
这张照片是在公园里拍的。
天空是蓝色的，有几朵白云。
照片中有三个人站在河边。
请用一个词回答这个问题。
图片中的狗是什么颜色的？
狗是棕色和白色的。
这是一辆红色的汽车。
桌子上有一杯咖啡和一本书。
我们今天去看图片展览。
这张图片的左上角有一只鸟。
请详细描述图片的内容。
图片显示了一座被雪覆盖的山。
孩子们在学校旁边的公园里踢足球。
<用户>请描述这张图片。<AI>图中有一只猫坐在桌子上。
<用户>What is in the image?<AI>A cat is sitting on a wooden table.
<用户>Describe the photo.<AI>The photo shows a red car.
"""


def _placeholder_pieces() -> list[str]:
    # ids 3..100: reserved in the official layout; control pieces so text never maps onto them
    return [f"<reserved_{i}>" for i in range(3, FIRST_SPECIAL_ID)]


def write_tiny_tokenizer(out_dir: str | os.PathLike, seed: int = 0, vocab_size: int = 800) -> Path:
    """Train a tiny Llama-style BPE ``tokenizer.model`` in the official MiniCPM-V layout, plus configs.

    Deterministic for a given sentencepiece version (single thread, fixed seed, embedded corpus).
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Llama settings: no normalisation, dummy prefix, keep whitespace runs, bytes for the rest
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # control pieces take the ids after eos, user-defined ones follow: 3..100, then 101..114
        control_symbols=_placeholder_pieces(),
        user_defined_symbols=list(SPECIAL_PIECES) + list(ROLE_PIECES),
        num_threads=1,
        minloglevel=2,
    )
    (out / VOCAB_FILE).write_bytes(model.getvalue())
    _write_json(out / "tokenizer_config.json", official_tokenizer_config())
    _write_json(out / "special_tokens_map.json", official_special_tokens_map())
    return out


def _added_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}  # fmt: skip


def official_tokenizer_config() -> dict:
    """``tokenizer_config.json`` as the official release writes it (remote-code class included)."""
    decoder = {str(i): _added_token_entry(t) for i, t in enumerate((UNK, BOS, EOS))}
    decoder.update({str(FIRST_SPECIAL_ID + i): _added_token_entry(t) for i, t in enumerate(SPECIAL_PIECES)})
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_PIECES),
        "auto_map": {"AutoTokenizer": ["modeling_minicpmv.LlamaTokenizerWrapper", None]},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": UNK,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizerWrapper",
        "truncation_side": "right",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def official_special_tokens_map() -> dict:
    """``special_tokens_map.json`` as the official release writes it."""

    def entry(content: str) -> dict:
        return {k: v for k, v in _added_token_entry(content).items() if k != "special"}

    return {
        "additional_special_tokens": list(SPECIAL_PIECES),
        "bos_token": entry(BOS),
        "eos_token": entry(EOS),
        "pad_token": UNK,
        "unk_token": entry(UNK),
    }


def vocab_fingerprint(vocab_file: str | os.PathLike) -> str:
    """sha256 over (piece, score, type) of every id: pins a model independently of proto metadata."""
    sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
    h = hashlib.sha256()
    for i in range(sp.get_piece_size()):
        kind = "c" if sp.is_control(i) else "u" if sp.is_unknown(i) else "b" if sp.is_byte(i) else "n"
        h.update(f"{i}\t{sp.id_to_piece(i)}\t{sp.get_score(i):.6f}\t{kind}\n".encode())
    return h.hexdigest()
