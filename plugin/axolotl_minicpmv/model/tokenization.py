"""MiniCPM-V 2.0 tokenizer without remote code, for transformers 5.x.

Must give the same ids and decoded text as transformers 4.40's slow ``LlamaTokenizer`` (legacy=True,
add_bos_token=True, the 12 ``<image>``... pieces as additional special tokens) on the official files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer
from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers.utils import logging

logger = logging.get_logger(__name__)

SPIECE_UNDERLINE = "▁"
VOCAB_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# ids 101..112 of the official vocabulary, in this order
SPECIAL_PIECES = (
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>",
    "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>",
)  # fmt: skip
FIRST_SPECIAL_ID = 101
# chat role markers: single pieces, but ordinary text for the tokenizer
ROLE_PIECES = ("<用户>", "<AI>")
# class names that official tokenizer_config.json files name (remote code we never run)
OFFICIAL_CLASS_NAMES = ("LlamaTokenizerWrapper", "MiniCPMVTokenizer")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- shared attributes


class _MiniCPMVTokenMixin:
    """Names and ids the MiniCPM-V processor, model and chat code read off the tokenizer."""

    im_start = "<image>"
    im_end = "</image>"
    slice_start = "<slice>"
    slice_end = "</slice>"

    @property
    def im_start_id(self) -> int:
        return self.convert_tokens_to_ids(self.im_start)

    @property
    def im_end_id(self) -> int:
        return self.convert_tokens_to_ids(self.im_end)

    @property
    def slice_start_id(self) -> int:
        return self.convert_tokens_to_ids(self.slice_start)

    @property
    def slice_end_id(self) -> int:
        return self.convert_tokens_to_ids(self.slice_end)

    @property
    def unk_id(self) -> int:
        return self.unk_token_id

    @property
    def bos_id(self) -> int:
        return self.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.eos_token_id


def _check_legacy(legacy) -> None:
    # the official checkpoint was trained with the legacy (dummy prefix on every text chunk) behaviour
    if legacy is not None and not legacy:
        raise ValueError("MiniCPM-V 2.0 tokenizes with legacy=True; legacy=False would change the ids")


# kwargs that official configs / Axolotl / from_pretrained pass but that must not end up in a saved config
# (auto_map would point a saved folder back at the remote code)
_DROPPED_INIT_KWARGS = (
    "auto_map", "tokenizer_class", "use_fast", "trust_remote_code", "is_local", "local_files_only",
)  # fmt: skip


# --------------------------------------------------------------------------- sentencepiece route


class MiniCPMVTokenizer(_MiniCPMVTokenMixin, SentencePieceBackend):
    """Slow Llama tokenizer over ``tokenizer.model`` reproducing transformers 4.40 legacy behaviour.

    Encoding: split the text on added/special tokens, sentencepiece-encode every other chunk on its own
    (so each chunk gets the dummy ``▁`` prefix), prepend bos. Decoding follows 4.40's
    ``LlamaTokenizer.convert_tokens_to_string`` quirks (space before a special token, first ``▁`` dropped).
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=UNK,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool | None = True,
        clean_up_tokenization_spaces: bool = False,
        spaces_between_special_tokens: bool = False,
        extra_special_tokens=None,
        **kwargs,
    ):
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"MiniCPMVTokenizer needs a sentencepiece {VOCAB_FILE}, got {vocab_file!r}")
        _check_legacy(legacy)
        for key in _DROPPED_INIT_KWARGS + ("tokenizer_file",):
            kwargs.pop(key, None)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        if extra_special_tokens is None:
            extra_special_tokens = list(SPECIAL_PIECES)
        special = {
            name: AddedToken(tok, normalized=False, special=True) if isinstance(tok, str) else tok
            for name, tok in (("unk_token", unk_token), ("bos_token", bos_token),
                              ("eos_token", eos_token), ("pad_token", pad_token))
        }  # fmt: skip
        super().__init__(
            vocab_file=vocab_file,
            legacy=True,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            spaces_between_special_tokens=spaces_between_special_tokens,
            extra_special_tokens=extra_special_tokens,
            **special,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # a directory with only tokenizer.json (no sentencepiece model) goes to the tokenizers route
        path = Path(pretrained_model_name_or_path)
        if cls is MiniCPMVTokenizer and path.is_dir() and not (path / VOCAB_FILE).is_file():
            if (path / TOKENIZER_FILE).is_file():
                return MiniCPMVTokenizerFast.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            raise _missing_files_error(path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Written in a private folder, completed there, then moved into place file by file (os.replace is
        # atomic): Axolotl saves the tokenizer from every rank into the one output folder, and a rank that
        # read back a file another rank was writing got half a JSON file.
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target, prefix=".tokenizer-") as private:
            files = super().save_pretrained(private, *args, **kwargs)
            # transformers 5 leaves these out (its fast tokenizers bake them into tokenizer.json); we need them
            config_file = Path(private) / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
            _write_json(config_file, dict(sorted(config.items())))
            for written in sorted(p for p in Path(private).rglob("*") if p.is_file()):
                placed = target / written.relative_to(private)
                placed.parent.mkdir(parents=True, exist_ok=True)
                os.replace(written, placed)
        return tuple(str(target / Path(file).relative_to(private)) for file in files)  # the names transformers gives

    # -- encoding

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # legacy: the chunk is encoded as is; sentencepiece adds the dummy prefix to every chunk
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    # -- decoding (4.40 semantics)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if not tokens:
            return ""
        tokens = list(tokens)
        # the dummy prefix of the first piece is not part of the text
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        specials = set(self.all_special_tokens)
        out, pending, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in specials:
                # legacy quirk: a space before a special token that follows text
                if not prev_special and i != 0:
                    out += " "
                out += self.sp_model.decode(pending) + token
                pending, prev_special = [], True
            else:
                if prev_special and i == 1 and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                pending.append(token)
                prev_special = False
        return out + self.sp_model.decode(pending)

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        specials = set(self.all_special_tokens)
        # tokens added after the fact (not in the sentencepiece model) are joined verbatim, as 4.40 did
        verbatim = (set(self._added_tokens_encoder) - specials) | {
            t for t in self.extra_special_tokens if self.convert_tokens_to_ids(str(t)) >= self.vocab_size
        }
        parts, current = [], []
        for token in tokens:
            if token in verbatim:
                if current:
                    text = self.convert_tokens_to_string(current)
                    if text:
                        parts.append(text)
                    current = []
                parts.append(token)
            else:
                current.append(token)
        if current:
            parts.append(self.convert_tokens_to_string(current))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text


# --------------------------------------------------------------------------- tokenizer.json route


class MiniCPMVTokenizerFast(_MiniCPMVTokenMixin, TokenizersBackend):
    """``tokenizer.json`` as shipped (later official revisions), used only when there is no tokenizer.model."""

    vocab_files_names = {"tokenizer_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, *args, legacy: bool | None = True, **kwargs):
        _check_legacy(legacy)
        for key in _DROPPED_INIT_KWARGS + ("vocab_file",):
            kwargs.pop(key, None)
        # a bare tokenizer.json folder still gets the official special tokens
        for name, default in (("unk_token", UNK), ("bos_token", BOS), ("eos_token", EOS), ("pad_token", UNK)):
            kwargs.setdefault(name, default)
        if not kwargs.get("extra_special_tokens") and not kwargs.get("additional_special_tokens"):
            kwargs["extra_special_tokens"] = list(SPECIAL_PIECES)
        super().__init__(*args, **kwargs)
        logger.warning(
            "MiniCPM-V tokenizer built from %s alone: ids are those of that file, which can differ from the official "
            "slow tokenizer (e.g. the role markers <用户>/<AI>); put the official %s next to it for exact ids.",
            TOKENIZER_FILE,
            VOCAB_FILE,
        )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # use tokenizer.json whole (normalizer, pre-tokenizer, decoder): transformers would otherwise rebuild
        # a bare BPE from its vocab/merges because this class defines __init__
        tokenizer_file = kwargs.pop("tokenizer_file", None)
        if tokenizer_file is not None and os.path.isfile(tokenizer_file):
            kwargs["tokenizer_object"] = Tokenizer.from_file(tokenizer_file)
            return kwargs
        return super().convert_to_native_format(trust_remote_code=trust_remote_code, **kwargs)


# --------------------------------------------------------------------------- loading and registration


def _missing_files_error(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"No MiniCPM-V tokenizer files in {str(path)!r}: neither {VOCAB_FILE} nor {TOKENIZER_FILE} exists there")


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """Tokenizer of a MiniCPM-V 2.0 directory or hub id; ignores the remote-code class named in its config.

    Prefers ``tokenizer.model`` (the exact official behaviour); falls back to ``tokenizer.json``.
    """
    from .checkpoint import is_hub_id

    if is_hub_id(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), allow_patterns=["tokenizer*", "special_tokens_map.json"])
    path = Path(path)
    if (path / VOCAB_FILE).is_file():
        return MiniCPMVTokenizer.from_pretrained(str(path), **kwargs)
    if (path / TOKENIZER_FILE).is_file():
        return MiniCPMVTokenizerFast.from_pretrained(str(path), **kwargs)
    raise _missing_files_error(path)


def register_tokenizer() -> None:
    """Make ``AutoTokenizer.from_pretrained`` return our tokenizer for official MiniCPM-V 2.0 folders.

    Official configs name a remote-code class (``LlamaTokenizerWrapper``/``MiniCPMVTokenizer``) with an
    ``auto_map``; registering those names as local classes makes transformers prefer the local class, without
    trust_remote_code. The config class is deliberately NOT put in TOKENIZER_MAPPING: that would turn the
    local class into "not explicit" and, with trust_remote_code=True, transformers would run remote code.
    Idempotent.
    """
    from transformers.models.auto import tokenization_auto as auto

    before = sys.modules["transformers"]
    # the first import of processing_utils re-executes transformers/__init__ and swaps the module object in
    # sys.modules: trigger it now so the attributes set below land on the object everybody sees from now on
    import transformers.processing_utils  # noqa: F401

    after = sys.modules["transformers"]

    for name in OFFICIAL_CLASS_NAMES:
        auto.REGISTERED_TOKENIZER_CLASSES[name] = MiniCPMVTokenizer
    auto.REGISTERED_TOKENIZER_CLASSES[MiniCPMVTokenizerFast.__name__] = MiniCPMVTokenizerFast
    # model_type -> class name: transformers 5.16.1 maps "minicpmv" to TokenizersBackend, which would
    # win whenever tokenizer_config.json has no auto_map (e.g. after our own save_pretrained)
    auto.TOKENIZER_MAPPING_NAMES["minicpmv"] = MiniCPMVTokenizer.__name__
    # Axolotl's `tokenizer_type:` does getattr(transformers, name)
    for module in {id(before): before, id(after): after}.values():
        for cls in (MiniCPMVTokenizer, MiniCPMVTokenizerFast):
            module.__dict__[cls.__name__] = cls
