"""Answers for a batch of conversations in one `generate` call: prediction, evaluation and serving use it.

The prompts are left-padded with an attention mask (transformers derives the positions from it) and the
images of the whole batch go through the vision tower grouped by size. Greedy answers equal one-by-one
`chat(..., sampling=False, num_beams=1)` answers (tests/test_predict.py, float32). On a GPU, greedy and
sampled batches without a streamer decode through `FastDecoder` (the same tokens in float32:
tests/test_fast_decoding.py); beam search, streaming and stopping criteria go through `generate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.processing_minicpmv import MiniCPMVProcessor, move_inputs
from .chat import decode_answer, fast_generate, generation_config_for


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
    streamer=None,
    stopping_criteria=None,
    min_new_tokens: int = 0,
    fast: bool | None = None,
    inputs=None,
    **overrides,
) -> list[Generation]:
    """Answer the last user turn of each conversation (with its pictures, `<image>`-tagged or one in front).

    The generation settings are `chat`'s: the official defaults for `sampling` (beam search with 3 beams when
    False), with `overrides` for those keys (e.g. `num_beams=1` for greedy). `streamer` and `stopping_criteria`
    go to `generate` unchanged; `min_new_tokens` (every row) keeps eos away until that many tokens. `fast`
    (default: on a GPU wherever it applies) decodes through `FastDecoder`; `fast=True` where it cannot apply
    is an error. `inputs`: the processor's output for these conversations (left padding, `max_inp_length`),
    made ahead on the CPU, e.g. while the previous batch ran.
    """
    config = generation_config_for(sampling, overrides)
    applies = config.get("num_beams", 1) == 1 and streamer is None and stopping_criteria is None
    if fast is None:
        fast = applies and model.device.type == "cuda"
    elif fast and not applies:
        raise ValueError("fast decoding is greedy or sampled (num_beams=1), without a streamer or stopping criteria")
    if inputs is None:
        batch = processor(conversations, images, padding_side="left", max_length=max_inp_length, device=model.device)
    else:
        batch = move_inputs(inputs, model.device)
    embeds = model.embed_inputs(batch["input_ids"], batch.get("pixel_values"), batch.get("vision_order"), batch.get("image_bound"))
    tokenizer = processor.tokenizer
    if fast:
        output = fast_generate(model, embeds, config, tokenizer, max_new_tokens, batch["attention_mask"], min_new_tokens)
    else:
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
                streamer=streamer,
                stopping_criteria=stopping_criteria,
                **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
                **config,
            )
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, ids in enumerate(output.tolist()):
        ended = tokenizer.eos_token_id in ids
        kept = ids[: ids.index(tokenizer.eos_token_id) + 1] if ended else _strip_padding(ids)
        finish = "stop" if ended or len(kept) < max_new_tokens else "length"
        results.append(Generation(decode_answer(torch.tensor(kept), tokenizer), kept, int(prompt_tokens[row]), finish))
    return results


def _strip_padding(ids: list[int]) -> list[int]:
    # a row stopped by a stopping criterion (or, in FastDecoder, finished before the others) is padded with 0
    # (<unk>, also never a generated answer's last token)
    end = len(ids)
    while end and ids[end - 1] == 0:
        end -= 1
    return ids[:end]
