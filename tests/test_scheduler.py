"""The serving scheduler on the fast path (`FastDecoder`, as on a GPU; eager here): a batch of concurrent
streamed requests, each with its own token limit, gets the answers each request gets alone, streamed in the
same pieces as on the plain path. (The HTTP side, on the plain path: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio

from conftest import EXAMPLES
from PIL import Image

from axolotl_minicpmv.inference.generate import generate_answers
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor
from axolotl_minicpmv.serving.protocol import ChatRequest
from axolotl_minicpmv.serving.scheduler import Job, Prompt, Scheduler

GREEDY = {"num_beams": 1, "repetition_penalty": 1.2}


def _rows():
    images = EXAMPLES / "images"
    clock, stop_sign = Image.open(images / "clock.jpg").convert("RGB"), Image.open(images / "stop_sign.jpg").convert("RGB")
    questions = [
        ("What is this? <image>", [clock]),
        ("What is 17 times 3?", []),
        ("<image> and <image>: which is round?", [clock, stop_sign]),
        ("Describe it.", [stop_sign]),
    ]
    return [([{"role": "user", "content": text}], pictures) for text, pictures in questions] * 2


async def _serve_all(scheduler: Scheduler, requests) -> list[tuple[list[str], object]]:
    loop = asyncio.get_running_loop()
    processor = scheduler.processor
    jobs = [Job(request, Prompt(*processor.inference_inputs(request.conversation, pictures, 2048)), loop) for request, pictures in requests]
    with scheduler._cond:  # all queued before the worker looks: one batch
        for job in jobs:
            scheduler.submit(job)

    async def collect(job):
        deltas = []
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                deltas.append(payload)
            elif kind == "done":
                return deltas, payload
            else:
                raise payload

    return await asyncio.gather(*(collect(job) for job in jobs))


def test_a_batch_of_streams_gets_the_solo_answers_fast_and_plain(tiny_model, tiny_tokenizer):
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    rows = _rows()
    limits = [6, 14, 9, 20, 3, 11, 17, 8]  # each row ends at its own max_tokens, inside one batch
    requests = [
        (ChatRequest(conversation, [], limit, True, dict(GREEDY), stream=True), pictures)
        for (conversation, pictures), limit in zip(rows, limits)
    ]
    served = {}
    for fast in (True, False):
        scheduler = Scheduler(tiny_model, processor, max_batch_size=8, fast=fast)
        try:
            scheduler.warm_up()  # on a CPU one eager step; compiles nothing
            if fast:  # caches for a lone request and for a full batch are made before any client comes
                decoder = tiny_model._fast_decoder
                (single, single_len), (batched, batched_len) = decoder._slot(1).key, decoder._slot(8).key
                assert single == 1 and batched >= 8 and min(single_len, batched_len) >= 1024
            served[fast] = asyncio.run(_serve_all(scheduler, requests))
            assert scheduler.stats["largest_batch"] == 8
        finally:
            scheduler.close()
    assert served[True] == served[False]  # the same streamed pieces and results
    for (conversation, pictures), limit, (deltas, result) in zip(rows, limits, served[True]):
        solo = generate_answers(tiny_model, processor, [conversation], [pictures], max_new_tokens=limit, fast=False, **GREEDY)[0]
        assert (result.text, result.completion_tokens, result.finish_reason) == (solo.text, len(solo.token_ids), solo.finish_reason)
        assert deltas  # streamed
    assert len({result.text for _, result in served[True]}) > 2
