"""The seed's chat helper: base64 image + JSON-encoded `msgs` in, answer string out.

`MiniCPMVChat(model_path, adapter=...)` loads a base model (plus an exported adapter) on the best
device available; `chat({"image": img2base64(path), "question": json.dumps(msgs)})` answers.
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch

from ..model.processing_minicpmv import InvalidInputError, load_image
from ..model.tokenization import load_tokenizer
from ..weights.loading import load_model

DEFAULT_DTYPES = {"cuda": torch.bfloat16, "mps": torch.float16, "cpu": torch.float32}
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def img2base64(path: str | Path) -> str:
    """Base64 text of an image file, as `MiniCPMVChat.chat` takes it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """`dtype` as a torch dtype (a name of DTYPE_NAMES, or None: the device's default, float32 where none is known),
    or ValueError naming what is wrong."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_NAMES)}")
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    return DEFAULT_DTYPES.get(kind, torch.float32)


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class MiniCPMVChat:
    """Chat with a MiniCPM-V 2.0 checkpoint (hub id or directory), optionally with an exported adapter."""

    def __init__(self, model_path: str, adapter: str | None = None, device: str | None = None, dtype: torch.dtype | str | None = None):
        self.device = device or pick_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(model_path, adapter=adapter, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_path)

    def chat(self, input: dict, sampling: bool = True, **generate_kwargs) -> str:
        """`input = {"image": base64 or None, "question": JSON list of {role, content}}` -> answer.

        Sampling defaults follow the seed (temperature 0.7); pass `sampling=False` for beam search, and
        `fast=True` for the compiled fast path, `fast=False` for `generate` (see `chat`).
        """
        if not isinstance(input, dict) or "question" not in input:
            raise InvalidInputError("input must be a dict with a 'question' key (JSON list of {role, content}) and an optional 'image' key")
        image = input.get("image")
        image = None if image is None else load_image(image, what="input['image']")
        if sampling:
            generate_kwargs.setdefault("temperature", 0.7)
        answer, _, _ = self.model.chat(
            image=image, msgs=input["question"], context=None, tokenizer=self.tokenizer, sampling=sampling, **generate_kwargs
        )
        return answer
