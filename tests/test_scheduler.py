"""The serving scheduler on the fast path (`FastDecoder`, as on a GPU; eager here): a batch of concurrent
streamed requests, each with its own token limit, gets the answers each request gets alone, streamed in the
same pieces as on the plain path; batches and requests kept within the server's context (`--max-model-len`). (The
HTTP side, on the plain path: tests/test_serve.py.)"""

from __future__ import annotations

import asyncio

import pytest
from conftest import EXAMPLES
from PIL import Image

from axolotl_minicpmv.inference.generate import generate_answers
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor
from axolotl_minicpmv.serving.protocol import ChatRequest, RequestError, fit_to_context
from axolotl_minicpmv.serving.scheduler import Job, Prompt, Scheduler, select_batch

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


async def _outcomes(scheduler: Scheduler, requests) -> list[tuple[list[str], str, object]]:
    """(deltas, "done" or "error", result or exception) of each (request, pictures), all queued as one batch."""
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
            else:
                return deltas, kind, payload

    return await asyncio.gather(*(collect(job) for job in jobs))


async def _serve_all(scheduler: Scheduler, requests) -> list[tuple[list[str], object]]:
    served = []
    for deltas, kind, payload in await _outcomes(scheduler, requests):
        if kind == "error":
            raise payload
        served.append((deltas, payload))
    return served


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
                # both for the server's whole context (max_model_len, 2048 by default): no request compiles later
                assert single == 1 and batched >= 8 and single_len == batched_len == scheduler.max_model_len == 2048
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


# ------------------------------------------------------------------ the server's context (--max-model-len)


def test_requests_are_fitted_to_the_servers_context():
    """vLLM's rule: prompt + max_tokens within max_model_len, refused otherwise (naming the numbers); an unset
    max_tokens becomes what the context leaves, at most the server's --max-tokens."""
    asked = ChatRequest([{"role": "user", "content": "hi"}], [], 100, True, dict(GREEDY))
    assert fit_to_context(asked, 1948, 2048, 1024) is asked  # exactly fits
    with pytest.raises(RequestError) as err:
        fit_to_context(asked, 1949, 2048, 1024)
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    assert "2049 tokens" in err.value.message and "at most 99 new tokens" in err.value.message
    unset = ChatRequest([{"role": "user", "content": "hi"}], [], None, True, dict(GREEDY))
    assert fit_to_context(unset, 1500, 2048, 1024).max_tokens == 548
    assert fit_to_context(unset, 10, 2048, 1024).max_tokens == 1024
    for prompt_tokens in (2048, 3000):
        with pytest.raises(RequestError) as err:
            fit_to_context(unset, prompt_tokens, 2048, 1024)
        assert err.value.param == "messages" and "leaves 0 of the server's context of 2048" in err.value.message
    with pytest.raises(RequestError):  # min_tokens cannot fit in what is left
        fit_to_context(ChatRequest([], [], None, True, dict(GREEDY), min_tokens=50), 2000, 2048, 1024)


def test_a_batch_stays_within_the_compiled_context():
    """Jobs join the oldest job's batch in order while the longest prompt plus the largest max_tokens fits
    max_model_len; the others (and jobs with other settings) wait, a seeded job runs alone."""

    def job(prompt_tokens, max_tokens, **settings):
        request = ChatRequest([{"role": "user", "content": "q"}], [], max_tokens, True, dict(GREEDY), **settings)
        return Job(request, Prompt([1] * prompt_tokens, []), loop=None)

    first, long_prompt, long_answer, fits, other = job(1000, 500), job(1500, 10), job(20, 1100), job(900, 540), job(10, 10, min_tokens=5)
    pending = [first, long_prompt, other, long_answer, fits]
    # 1000 + 500, then 1500 + 500 fit; 1500 + 1100 does not (long_answer waits); 1500 + 540 = 2040 fits
    assert select_batch(pending, 8, 2048) == [first, long_prompt, fits]
    assert select_batch(pending, 2, 2048) == [first, long_prompt]
    assert select_batch([long_answer, other, first], 8, 2048) == [long_answer]  # 1000 + 1100 > 2048
    assert select_batch([other, first], 8, 2048) == [other]  # other settings
    seeded = job(10, 10, seed=3)
    assert select_batch([seeded, job(10, 10, seed=3)], 8, 2048) == [seeded]
    assert select_batch([job(3000, 10)], 8, 2048) != []  # the oldest job always runs (the API refuses it before)


# ------------------------------------------------------------------ failures and stop strings while streaming


def test_a_batch_failing_midway_retries_alone_only_the_requests_that_streamed_nothing(tiny_model, tiny_tokenizer):
    """The decoder raises once at its sixth call (as a GPU running out of memory would): the streamed request, whose
    client already has part of an answer, gets the error (running it again would send that part twice, or other
    text); the plain one is answered alone, with its solo answer."""
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    conversation = [{"role": "user", "content": "Tell me a story."}]
    streamed, plain = (ChatRequest(conversation, [], 20, True, dict(GREEDY), stream=stream) for stream in (True, False))
    calls = 0

    def fail_once(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 6:
            raise RuntimeError("out of memory (injected)")

    hook = tiny_model.llm.register_forward_hook(fail_once)
    scheduler = Scheduler(tiny_model, processor, max_batch_size=2, fast=False)
    try:
        (deltas, kind, error), (_, plain_kind, result) = asyncio.run(_outcomes(scheduler, [(streamed, []), (plain, [])]))
    finally:
        scheduler.close()
        hook.remove()
    solo = generate_answers(tiny_model, processor, [conversation], [[]], max_new_tokens=20, fast=False, **GREEDY)[0]
    assert deltas and kind == "error" and "injected" in str(error)
    assert solo.text.startswith("".join(deltas))  # what was streamed once, and only once
    assert plain_kind == "done" and result.text == solo.text
    assert scheduler.stats["failed"] == 1 and scheduler.stats["completed"] == 1


def test_streamed_text_before_a_stop_string_is_the_answer(tiny_tokenizer):
    """The text before a stop string is stripped, as the answer is: a space streamed in front of a stop string's
    first character (held back while it could still become the stop string) must not reach the client."""
    from axolotl_minicpmv.serving.scheduler import _Row

    async def stream() -> tuple[str, str]:
        request = ChatRequest([{"role": "user", "content": "hi"}], [], 40, True, dict(GREEDY), stop=["天a"], stream=True)
        job = Job(request, Prompt([], []), asyncio.get_running_loop())
        row = _Row(job, tiny_tokenizer)
        for token in tiny_tokenizer.encode("one two 天a three", add_special_tokens=False):
            row.add(token)
        row.finish(row.text)
        await asyncio.sleep(0)  # the emitted deltas reach the queue
        deltas = [job.events.get_nowait()[1] for _ in range(job.events.qsize())]
        return "".join(deltas), row.text

    streamed, answer = asyncio.run(stream())
    assert answer == "one two" and streamed == answer


def test_streamed_text_is_the_answers_decoding_around_special_tokens_and_spaces(tiny_tokenizer):
    """Streams of grounding tags (`<box>`...), a repeated bos and pieces of spaces only join to the whole answer's
    decoding (`decode_answer`, as an unstreamed request gets it). The legacy decoding puts a space in front of the
    text between two special tokens once the second comes, and sentencepiece drops a decoding's leading spaces, so
    a plain incremental decoding streamed `readd</box>`, `tablee<s>like` and one space of two."""
    import random

    import torch

    from axolotl_minicpmv.inference.chat import decode_answer
    from axolotl_minicpmv.serving.scheduler import _Row

    tok = tiny_tokenizer
    specials = sorted(set(tok.all_special_ids) - {0, tok.eos_token_id})
    plain = [i for i in range(3, len(tok)) if i not in tok.all_special_ids]
    rng = random.Random(0)
    answers = [tok.convert_tokens_to_ids(pieces) for pieces in (["▁read", "</box>", "▁re"], ["a", "▁", "▁C"], ["<s>", "<s>", "▁t"])]
    for _ in range(400):
        ids = [rng.choice(plain) for _ in range(rng.randrange(1, 25))]
        for _ in range(rng.randrange(0, 4)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        answers.append(ids)

    async def stream(ids: list[int]) -> str:
        request = ChatRequest([{"role": "user", "content": "hi"}], [], 40, True, dict(GREEDY), stream=True)
        job = Job(request, Prompt([], []), asyncio.get_running_loop())
        row = _Row(job, tok)
        for token in ids:
            row.add(token)
        row.finish(decode_answer(torch.tensor(ids), tok))
        await asyncio.sleep(0)
        return "".join(job.events.get_nowait()[1] for _ in range(job.events.qsize()))

    differ = [ids for ids in answers if asyncio.run(stream(ids)) != decode_answer(torch.tensor(ids), tok)]
    assert not differ, [tok.convert_ids_to_tokens(ids) for ids in differ[:3]]
