"""Answers for a batch of conversations in one `generate` call: prediction, evaluation and serving use it.

The prompts are left-padded with an attention mask (transformers derives the positions from it) and the
images of the whole batch go through the vision tower grouped by size (on a GPU in 16-bit: every size in one
packed pass, `model/packed_vision.py`). Greedy answers equal one-by-one
`chat(..., sampling=False, num_beams=1)` answers (tests/test_predict.py, float32). On a GPU, greedy and
sampled batches decode through `FastDecoder` (the same tokens in float32: tests/test_fast_decoding.py),
streamed ones too; beam search goes through `generate` unless `fast=True` asks for FastDecoder's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..model.processing_minicpmv import MiniCPMVProcessor, move_inputs
from .chat import decode_answer, fast_generate, generation_config_for, init_fast_path


@dataclass(frozen=True)
class Generation:
    """One conversation's answer."""

    text: str  # decoded as `chat` decodes it
    token_ids: list[int]  # the generated ids, up to and including eos (no padding)
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or a stopping criterion) or "length" (max_new_tokens reached)


@torch.inference_mode()
def generate_answers(
    model,
    processor: MiniCPMVProcessor,
    conversations: Sequence[Sequence[dict]],
    images: Sequence[Sequence] | None = None,
    *,
    sampling: bool = False,
    max_new_tokens: int = 1024,
    max_inp_length: int = 2048,
    on_tokens: Callable[[list[int]], Iterable[int]] | None = None,
    min_new_tokens: int = 0,
    fast: bool | None = None,
    inputs=None,
    **overrides,
) -> list[Generation]:
    """Answer the last user turn of each conversation (with its pictures, `<image>`-tagged or one in front).

    The generation settings are `chat`'s: the official defaults for `sampling` (beam search with 3 beams when
    False), with `overrides` for those keys (e.g. `num_beams=1` for greedy). `on_tokens` streams: it gets each
    step's tokens, one per row (pad for ended rows), and returns the rows to end there (num_beams=1 only);
    `min_new_tokens` (every row) keeps eos away until that many tokens. `fast` decodes through `FastDecoder`
    (default: on a GPU, greedy and sampled batches; beam search when asked for). `inputs`: the processor's output for these conversations (left padding, `max_inp_length`),
    made ahead on the CPU, e.g. while the previous batch ran.
    """
    config = generation_config_for(sampling, overrides)
    greedy_or_sampled = config.get("num_beams", 1) == 1
    if on_tokens is not None and not greedy_or_sampled:
        raise ValueError("streaming (on_tokens) needs num_beams=1")
    fast = decodes_fast(model, greedy_or_sampled, fast)
    if inputs is None:
        batch = processor(conversations, images, padding_side="left", max_length=max_inp_length, device=model.device)
    else:
        batch = move_inputs(inputs, model.device)
    if fast:
        init_fast_path(model)
    # None: the model's own, which on a GPU in 16-bit packs a batch's sizes into one pass (one size: one eager tower
    # call), so batches of ever new stack shapes compile nothing.
    encode = None
    if fast and len(conversations) == 1:  # a lone conversation's few stacks are launch-bound: recurring shapes replay CUDA graphs
        encode = model._fast_encode_images
    elif fast and not model.can_pack_images(batch.get("pixel_values") or []):
        encode = model._fast_encode_stacks
    embeds = model.embed_inputs(
        batch["input_ids"], batch.get("pixel_values"), batch.get("vision_order"), batch.get("image_bound"), encode=encode
    )
    tokenizer = processor.tokenizer
    if on_tokens is not None:
        on_tokens = _EndedRows(on_tokens)
    if fast:
        output = fast_generate(
            model._fast_decoder, embeds, config, tokenizer, max_new_tokens, batch["attention_mask"], min_new_tokens, on_tokens
        )
    else:
        per_step = {} if on_tokens is None else _StepCallback(on_tokens, len(embeds)).generate_kwargs()
        with warnings.catch_warnings():
            # As in `chat`, the repetition penalty sees only generated tokens.
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            output = model.generate(
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                max_new_tokens=max_new_tokens,
                **per_step,
                **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
                **config,
            )
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, ids in enumerate(output.tolist()):
        # A row holds its tokens up to its eos or the step `on_tokens` ended it, pad after; the others run the
        # whole width. (Pad is <unk>, 0, which a random model may also generate: lengths never come from it.)
        stopped = on_tokens is not None and row in on_tokens.last_step
        if stopped:
            ids = ids[: on_tokens.last_step[row] + 1]
        ended = tokenizer.eos_token_id in ids
        kept = ids[: ids.index(tokenizer.eos_token_id) + 1] if ended else ids
        finish = "stop" if ended or stopped or len(kept) < max_new_tokens else "length"
        results.append(Generation(decode_answer(torch.tensor(kept), tokenizer), kept, int(prompt_tokens[row]), finish))
    return results


def decodes_fast(model, greedy_or_sampled: bool, fast: bool | None) -> bool:
    """Whether `generate_answers` decodes through FastDecoder: as `fast` says, else greedy and sampled answers
    on a GPU (FastDecoder's beam search is not yet measured on a GPU: asked for, not the default)."""
    return greedy_or_sampled and model.device.type == "cuda" if fast is None else fast


def reserve_decoding(model, rows: int, length: int) -> None:
    """Size FastDecoder's cache for up to `rows` conversations of prompt + new tokens up to `length` now, before
    `generate_answers` calls that decode greedily or sampled through it, so that none of them grows it and
    compiles again."""
    init_fast_path(model)
    model._fast_decoder.reserve(rows, length)


class _EndedRows:
    """`on_tokens` as given, noting the step (token index) at which it first ended each row."""

    def __init__(self, on_tokens: Callable[[list[int]], Iterable[int]]):
        self.on_tokens, self.step, self.last_step = on_tokens, 0, {}

    def __call__(self, tokens: list[int]) -> list[int]:
        ended = list(self.on_tokens(tokens))
        for row in ended:
            self.last_step.setdefault(row, self.step)
        self.step += 1
        return ended


class _StepCallback(StoppingCriteria):
    """`on_tokens` for `generate`: its streamer hands over each step's tokens, its stopping criterion ends the
    rows that `on_tokens` returned (later tokens of an ended row are pad, as after an eos)."""

    def __init__(self, on_tokens, batch: int):
        self.on_tokens = on_tokens
        self.ended = [False] * batch

    def generate_kwargs(self) -> dict:
        return {"streamer": self, "stopping_criteria": StoppingCriteriaList([self])}

    def put(self, value: torch.Tensor) -> None:  # the streamer's side
        if value.dim() != 1:  # the prompt (empty: generation starts from embeddings)
            return
        for row in self.on_tokens(value.tolist()):
            self.ended[row] = True

    def end(self) -> None:
        pass

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)
