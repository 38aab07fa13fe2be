"""The one thread that runs the model: queued requests are batched through `generate_answers`.

A request comes with its `Prompt` (ids and pixels, made in the request's own thread by the processor's
`prompt_ids` and `inference_pixels`), so the model's thread only pads prompts into a batch. Batches form between
`generate_answers` calls (on a GPU they decode through `FastDecoder`, streamed step by step): requests that
arrive while a batch runs wait (up to `max_queue` of them) and join the next batch, up to `max_batch_size`,
taking the oldest request's generation settings and every waiting request with equal settings (one call has
one generation config; a request with a `seed` runs alone; `min_tokens` is part of the settings). Inside a
batch, the vision tower sees the pictures of all requests grouped by size, and each row has its own end: eos,
a stop string, its own `max_tokens`, or its client's disconnect. Greedy answers do not depend on the batch
(tests/test_serve.py: 8 concurrent clients, float32; tests/test_scheduler.py: the same on the fast path).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..inference.generate import generate_answers
from ..model.conversation import InvalidInputError
from .protocol import ChatRequest

logger = logging.getLogger("axolotl_minicpmv.serving")


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Prompt:
    """A request's model inputs: the prompt's token ids and its pictures' pixels (sources and cells, in order),
    as `MiniCPMVProcessor.inference_inputs` makes them (`Prompt(*processor.inference_inputs(...))`; the server
    makes the ids from the pictures' headers first, `prompt_ids`, then the pixels, `inference_pixels`)."""

    ids: list[int]
    pixels: list[torch.Tensor]


@dataclass
class Job:
    """One request on its way through the scheduler; events go to `events` on the server's event loop."""

    request: ChatRequest
    prompt: Prompt
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)

    def emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server's loop is gone (shutdown)
            pass

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


class _Row:
    """What one batch row has generated so far, and whether (and why) it has ended.

    Text is decoded incrementally (each step decodes a few tokens, as other servers' detokenizers do: the new
    tokens with the previous ones in front, so a piece's leading space survives), never the whole answer per
    step, which would cost O(length^2) per row. The finished answer is decoded whole, as `chat` decodes it.

    Special tokens (grounding tags such as `<box>`) are the exception: the tokenizer's decoding puts a space in
    front of the text between two of them once the second one comes (transformers 4.40's legacy rule, which the
    official answers follow). So each special token decodes the answer so far whole, and the text after the last
    one is streamed when the next one comes or the answer ends: the stream stays the answer's exact start.
    """

    def __init__(self, job: Job, tokenizer):
        self.job, self.tokenizer = job, tokenizer
        self.ids: list[int] = []  # generated ids, eos included
        self.text_ids: list[int] = []  # without eos / padding: what is decoded
        self.window = (0, 0)  # (first, read) offsets into text_ids of the incremental decoder
        self.reason: str | None = None
        self.text = ""  # the text decoded so far (cut before a stop string once one appears)
        self.exact = ""  # the whole decoding up to the last special token: the answer's exact start
        self.specials = _special_ids(tokenizer)
        self.sent = ""  # the text streamed already (always a prefix of `text` until the end)
        self.needs_text = job.request.stream or bool(job.request.stop)
        self.holdback = max((len(s) for s in job.request.stop), default=1) - 1

    def add(self, token: int) -> None:
        if self.reason is not None:
            return  # an ended row gets padding
        self.ids.append(token)
        if token == self.tokenizer.eos_token_id:
            self.reason = "stop"
        elif token != 0 and not (token == self.tokenizer.bos_token_id and not any(self.ids[:-1])):  # as `decode_answer`
            self.text_ids.append(token)
        if self.needs_text and self.reason is None:
            before = len(self.text)
            if token in self.specials and self.text_ids and self.text_ids[-1] == token:
                self.text = self.exact = self.tokenizer.decode(self.text_ids).lstrip()
                self.window = (len(self.text_ids), len(self.text_ids))
                before = 0  # the spaces may have moved: look for the stop strings again
            else:
                self.text += self._increment()
            for stop in self.job.request.stop:
                at = self.text.find(stop, max(0, before - len(stop)))
                if at >= 0:
                    self.text, self.reason = self.text[:at].rstrip(), "stop"
        if self.reason is None and len(self.ids) >= self.job.request.max_tokens:
            self.reason = "length"
        if self.reason is None and self.job.cancelled.is_set():
            self.reason = "cancelled"
        if self.job.request.stream and self.reason is None:
            # hold back what could still become a stop string, and trailing spaces (`chat` strips the answer, and
            # the text before a stop string is stripped too)
            ready = self.exact if self.exact else self.text.rstrip()
            ready = ready[: len(ready) - self.holdback].rstrip() if self.holdback else ready
            if len(ready) > len(self.sent):
                self.job.emit("delta", ready[len(self.sent) :])
                self.sent = ready

    def _increment(self) -> str:
        first, read = self.window
        before = self.tokenizer.decode(self.text_ids[first:read]) if read > first else ""
        after = self.tokenizer.decode(self.text_ids[first:])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # wait for the rest of a UTF-8 character
            return ""
        if not self.text:
            after, before = after.lstrip(), before.lstrip()  # `chat` strips the answer's start
        # sentencepiece drops the leading spaces of a decoding: a window must not start at a piece of spaces only
        blank = self.tokenizer.convert_ids_to_tokens(self.text_ids[read]).strip("\u2581 ") == ""
        self.window = (first if blank else read, len(self.text_ids))
        return after[len(before) :]

    def finish(self, answer: str) -> None:
        """Stream the rest of the finished answer: exactly `answer` when what was sent is its start."""
        if answer.startswith(self.sent):
            rest = answer[len(self.sent) :]
        else:  # incremental decoding differed from decoding the whole answer (rare): finish incrementally
            _warn_stream_mismatch()
            rest = (self.text + self._increment()).rstrip()[len(self.sent) :]
        if rest:
            self.job.emit("delta", rest)


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer) -> frozenset[int]:
    """The ids that decode as a whole token of their own (special and added tokens), not as sentencepiece text."""
    return frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.added_tokens_decoder)


@functools.cache
def _warn_stream_mismatch() -> None:  # once per process: with some tokenizers it is every request
    logger.warning("streamed text differs from the whole answer's decoding; finishing such streams incrementally")


class _Rows:
    """`generate_answers`' `on_tokens` for a batch: each step's tokens go to their rows; returns the rows that
    ended there (stop string, own max_tokens, disconnect), or every row on a shutdown."""

    def __init__(self, rows: list[_Row], stopping: threading.Event):
        self.rows, self.stopping = rows, stopping

    def __call__(self, tokens: list[int]) -> list[int]:
        for row, token in zip(self.rows, tokens):
            row.add(token)
        for row in self.rows:
            if row.reason is None and row.job.cancelled.is_set():
                row.reason = "cancelled"
        if self.stopping.is_set():
            return list(range(len(self.rows)))
        return [i for i, row in enumerate(self.rows) if row.reason is not None]


def select_batch(pending: Sequence[Job], max_batch_size: int, max_model_len: int) -> list[Job]:
    """The next batch from the queue: the oldest job, then the waiting jobs with its generation settings (one
    `generate` call has one config), in order, up to `max_batch_size`, while the batch's longest prompt plus its
    largest `max_tokens` stays within `max_model_len` (a job that would overflow it waits for a later batch: the
    caches were compiled for that context). A job with a seed runs alone."""
    first = pending[0]
    limit = 1 if first.request.seed is not None else max_batch_size
    batch, prompt, answer = [], 0, 0
    for job in pending:
        if len(batch) == limit:
            break
        if job.request.batch_key() != first.request.batch_key():
            continue
        longest, most = max(prompt, job.prompt_tokens), max(answer, job.request.max_tokens)
        if batch and longest + most > max_model_len:
            continue
        batch.append(job)
        prompt, answer = longest, most
    return batch


class Scheduler:
    """Owns the model: `submit` queues a Job (or raises QueueFull); one worker thread runs the batches."""

    def __init__(
        self, model, processor, *, max_batch_size: int = 8, max_queue: int = 64, max_model_len: int = 2048, fast: bool | None = None
    ):
        self.model, self.processor = model, processor
        self.fast = model.device.type == "cuda" if fast is None else fast  # FastDecoder (see generate_answers)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        # A batch's longest prompt plus its largest max_tokens stays within this (the API refuses a request that
        # alone does not fit it), so the caches warm_up compiles serve every batch.
        self.max_model_len = max_model_len
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self.running = 0
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "largest_batch": 0}
        self._seconds_per_batch = 1.0  # for Retry-After
        self._thread = threading.Thread(target=self._work, name="minicpmv-scheduler", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Compile the fast path before serving, for a lone request and for batches up to `max_batch_size`
        (FastDecoder keeps a cache for each), prompt + answer up to `max_model_len`, so that no client waits a
        compilation (on a CPU nothing compiles: one step runs). Nothing to do on the plain path."""
        if not self.fast:
            return
        logger.info(f"compiling the fast path for batches up to {self.max_batch_size} and {self.max_model_len} tokens (once; minutes)")
        start = time.monotonic()
        conversation = [{"role": "user", "content": "warm-up"}]
        # The vision tower's compiled blocks too, for a stack of one image and (the picture's 2x1 grid of cells)
        # for a varying number: without the second, the first request with several same-sized images compiles.
        picture = Image.new("RGB", (896, 448), "gray")
        prompt = len(self.processor([conversation], [[picture]])["input_ids"][0])
        for batch in sorted({1, self.max_batch_size}):
            generate_answers(
                self.model,
                self.processor,
                [conversation] * batch,
                [[picture]] + [[]] * (batch - 1),
                max_new_tokens=self.max_model_len - prompt,
                num_beams=1,
                fast=True,
                on_tokens=lambda tokens: range(len(tokens)),  # a first token is enough: the step is compiled by then
            )
        self.stats["warm_up_s"] = round(time.monotonic() - start, 1)
        logger.info(f"fast path ready in {self.stats['warm_up_s']:.0f} s")

    @property
    def queued(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has room again, roughly (for the 503's Retry-After)."""
        return max(1, round(self._seconds_per_batch * (1 + self.queued / max(1, self.max_batch_size))))

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._cond.notify()

    def close(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._stopping.is_set():
                self._cond.wait()
            # drop requests whose clients left while they waited
            for job in [j for j in self._pending if j.cancelled.is_set()]:
                self._pending.remove(job)
                self.stats["cancelled"] += 1
                job.emit("done", Result("", "cancelled", job.prompt_tokens, 0))
            if not self._pending:
                return []
            batch = select_batch(self._pending, self.max_batch_size, self.max_model_len)
            for job in batch:
                self._pending.remove(job)
            self.running = len(batch)
            return batch

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            start = time.monotonic()
            try:
                self._run(batch)
            finally:
                self.running = 0
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.monotonic() - start)

    def _fail(self, job: Job, err: Exception) -> None:
        self.stats["failed"] += 1
        if not isinstance(err, InvalidInputError):
            logger.error(f"generation failed: {type(err).__name__}: {err}", exc_info=err)
        job.emit("error", err)

    def _run(self, batch: list[Job]) -> None:
        request = batch[0].request
        tokenizer = self.processor.tokenizer
        rows = [_Row(job, tokenizer) for job in batch]
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        device = self.model.device
        try:
            # a seed decides its own batch only: the random state of later, unseeded requests is left as it was
            accelerated = device.type != "cpu"
            with torch.random.fork_rng(
                devices=[device] if accelerated else [], device_type=device.type if accelerated else None, enabled=request.seed is not None
            ):
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                prompts = [{"input_ids": j.prompt.ids, "attention_mask": [1] * len(j.prompt.ids)} for j in batch]
                inputs = self.processor.batch(prompts, [j.prompt.pixels for j in batch], padding_side="left")
                generations = generate_answers(
                    self.model,
                    self.processor,
                    [j.request.conversation for j in batch],
                    inputs=inputs,
                    sampling=not request.greedy,
                    max_new_tokens=max(j.request.max_tokens for j in batch),
                    min_new_tokens=request.min_tokens,
                    on_tokens=_Rows(rows, self._stopping),
                    fast=self.fast,
                    **request.overrides,
                )
        except Exception as err:  # a failed batch must not stop the server
            for row in rows:
                if len(batch) > 1 and not row.sent:  # find the request that fails; the others still get their answers
                    self._run([row.job])
                else:  # alone, or its client has part of an answer that a second run would send again (or differently)
                    self._fail(row.job, err)
            return
        for row, generation in zip(rows, generations):
            reason = row.reason or generation.finish_reason
            if reason == "cancelled":
                self.stats["cancelled"] += 1
            else:
                self.stats["completed"] += 1
            text = row.text if row.job.request.stop else generation.text
            if row.job.request.stream:
                row.finish(text)
            row.job.emit("done", Result(text, reason, generation.prompt_tokens, len(generation.token_ids)))
