"""Batch prediction and scoring: `axolotl minicpmv-predict` / `python -m axolotl_minicpmv predict` and `predict()`.

A dataset in the training formats (read and checked by the training side's sample validation, `integration/data.py`)
becomes one request per answered assistant turn; requests, grouped by prompt size, are answered in batches by
`generate_answers` (greedy answers equal one-by-one `chat(sampling=False, num_beams=1)` answers,
tests/test_predict.py), scored with `metrics.py`, and written one JSON line each, flushed as it completes. Bad
rows become rows with `error` and the run goes on (`strict=True` stops at the first). `--resume` skips the (id,
turn) pairs already written (a sample that failed as a whole: its id and position); the summary is computed from the whole output file, so each prediction counts once.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..inference.generate import decodes_fast, generate_answers, reserve_decoding
from ..inference.metrics import DEFAULT_METRICS, parse_metrics, score
from ..model.conversation import IMAGE_TAG, InvalidInputError, json_type, short_repr
from ..model.image_processing_minicpmv import load_image
from ..model.processing_minicpmv import MiniCPMVProcessor

if TYPE_CHECKING:
    from .formats import FormatSpec

LOG = logging.getLogger("axolotl_minicpmv.predict")

TURNS = ("last", "all")
# Batches whose inputs are made ahead of the one being answered, each by its own thread: one thread made a batch
# of 16 mixed pictures in 0.84-0.97 s on the 2-core development machine, two side by side in 0.44-0.67 s each.
PREFETCH_BATCHES = 3
# Requests are grouped by prompt size within windows of this many batches (`grouped_by_prompt_size`): a batch is
# padded to its longest prompt, and a window keeps the output close to the input's order.
GROUP_WINDOW_BATCHES = 8
# How many requests, the longest by an estimate, have their prompts tokenized to size the decoder's cache before
# the first batch (`longest_prompt`; tokenizing took 0.25-1.7 ms a prompt, too long for every prompt of a large run).
CACHE_CANDIDATES = 64


class PredictionError(RuntimeError):
    """A bad row under `strict=True`, or input that stops the whole run (unreadable file, bad option)."""


@dataclass
class Request:
    """One assistant turn to predict: the conversation before it, its pictures, and the reference answer(s)."""

    id: str
    turn: int | None  # index of the answered turn among the sample's assistant turns (0 = first); None: the sample failed
    question: str | None = None
    conversation: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)  # paths, encoded bytes or PIL images for the `<image>` tags of `conversation`
    references: list[str] = field(default_factory=list)
    error: str | None = None  # set when the sample cannot run; written as an error row
    image_sizes: list = field(default_factory=list)  # the images' [width, height] where known (read by the sample check)
    index: int | None = None  # the sample's position in the data

    @property
    def key(self) -> tuple:
        return _key(self.id, self.turn, self.index)


def _key(sample_id: str, turn: int | None, index: int | None) -> tuple:
    """What --resume matches: an answered turn by (id, turn); a sample that failed as a whole also by its position,
    since bad samples may share an id."""
    return (sample_id, turn) if turn is not None else (sample_id, None, index)


def row_key(row: dict) -> tuple:
    return _key(row["id"], row["turn"], row.get("index"))


# ------------------------------------------------------------------ reading samples


def read_sample_file(path: str | os.PathLike) -> list:
    """The raw samples of a dataset file or folder that training reads (JSON list, JSONL, Parquet, Arrow, a
    `save_to_disk` folder). A JSONL line that is not JSON becomes an error marker (its row is written with the
    reason) instead of stopping the run; an unreadable file raises."""
    from .data import InvalidDatasetError, read_samples

    path = Path(path)
    if not path.exists():
        raise PredictionError(f"--data {str(path)!r}: no such file or folder (a JSON, JSONL, Parquet or Arrow file of samples)")
    if path.suffix != ".jsonl":
        try:
            return read_samples(path)
        except InvalidDatasetError as err:
            raise PredictionError(str(err)) from None
    samples = []
    for line_no, line in enumerate(_lines(path.read_text(encoding="utf-8-sig")), 1):
        if line.strip():
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as err:
                samples.append(_BadLine(f"{path}: line {line_no} is not valid JSON ({err})", f"line-{line_no}"))
    if not samples:
        raise PredictionError(f"{path}: the dataset has no samples")
    return samples


def _lines(text: str) -> list[str]:
    """JSONL lines: split at "\n" only. `str.splitlines` also splits at U+2028, U+0085 and others, which JSON
    strings may hold unescaped (the output is written with `ensure_ascii=False`)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def images_base_dir(data: str | os.PathLike) -> Path:
    """Where a dataset's relative image paths resolve, as in training: a file's folder, or the folder itself."""
    data = Path(data)
    return data if data.is_dir() else data.parent


@dataclass
class _BadLine:
    reason: str
    id: str


def requests_from_samples(
    samples: Iterable,
    base_dir: str | os.PathLike = ".",
    turns: str = "last",
    source: str = "",
    spec: FormatSpec | None = None,
    image_root: str | os.PathLike | None = None,
) -> Iterator[Request]:
    """Requests of samples in any training format (seed, LLaVA/ShareGPT, messages, content parts: `spec`, detected
    per sample by default), with an optional top-level `answers`.

    Each sample is converted and checked as training does (`formats.to_seed`, `data.normalize_sample`: roles, tags,
    images exist or decode); a bad sample yields one error request naming the sample and the reason. `answers` (a
    list of strings) replaces the reference of the last assistant turn; with `answers` the conversation may end with
    the user's question. Relative image paths resolve against `image_root` when given (a run's `minicpmv_image_root`),
    else against `base_dir`.
    """
    from .data import describe_sample, normalize_sample, row_images
    from .formats import BadSample, FormatSpec, to_seed  # BadSample: why a sample is rejected

    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    base_dir = Path(base_dir)
    image_root = Path(image_root).expanduser().resolve() if image_root else None
    spec = spec or FormatSpec()
    prefix = f"{source}: " if source else ""
    seen: dict[str, int] = {}
    size_cache: dict = {}
    for index, sample in enumerate(samples):
        if isinstance(sample, _BadLine):
            yield Request(sample.id, None, error=sample.reason, index=index)
            continue
        raw_id = sample.get("id") if isinstance(sample, dict) else None
        sample_id = str(index if raw_id is None else raw_id)
        where = f"{prefix}{describe_sample(sample, index)}"
        try:
            answers = _answers(sample)
            seed, fields = to_seed(sample, spec)
            turns_ = seed.get("conversations") if isinstance(seed, dict) else None
            ends_with_user = isinstance(turns_, list) and turns_ and isinstance(turns_[-1], dict) and turns_[-1].get("role") == "user"
            if answers and ends_with_user:  # VQA style: the question alone, the answers beside it
                seed = {**seed, "conversations": turns_ + [{"role": "assistant", "content": answers[0]}]}
            row = normalize_sample(seed, index, base_dir, size_cache, fields=fields, image_root=image_root)
        except BadSample as err:
            yield Request(sample_id, None, error=f"{where}: {err}", index=index)
            continue
        if row["id"] in seen:
            yield Request(
                row["id"],
                None,
                error=f"{where}: duplicate id {row['id']!r} (first at index {seen[row['id']]}); ids must be unique",
                index=index,
            )
            continue
        seen[row["id"]] = index
        conversation = row["conversations"]
        positions = [i for i, msg in enumerate(conversation) if msg["role"] == "assistant"]
        chosen = list(enumerate(positions))[-1:] if turns == "last" else list(enumerate(positions))
        for turn, position in chosen:
            before = conversation[:position]
            tags = sum(msg["content"].count(IMAGE_TAG) for msg in before)
            last = turn == len(positions) - 1
            references = answers if (answers and last) else [conversation[position]["content"]]
            yield Request(
                row["id"],
                turn,
                before[-1]["content"],
                before,
                row_images(row)[:tags],  # paths, or the bytes of embedded pictures
                references=references,
                image_sizes=row["image_sizes"][:tags],
                index=index,
            )


def _answers(sample) -> list[str] | None:
    from .formats import BadSample

    if not isinstance(sample, dict) or sample.get("answers") is None:  # a table's null: no answers in this row
        return None
    answers = sample["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise BadSample(f"'answers' must be a non-empty list of non-empty strings, got {short_repr(answers)} (a JSON {json_type(answers)})")
    return answers


# ------------------------------------------------------------------ predicting


def predict(
    model,
    processor_or_tokenizer,
    samples: Iterable,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    sampling: bool = False,
    num_beams: int = 1,
    metrics: Sequence[str] = DEFAULT_METRICS,
    turns: str = "last",
    base_dir: str | os.PathLike = ".",
    max_inp_length: int = 2048,
    strict: bool = False,
    skip: Iterable[tuple] = (),
    spec: FormatSpec | None = None,
    **overrides,
) -> Iterator[dict]:
    """Answer and score `samples` (dicts in any training format, `Request`s, or a dataset path); yield one result per row.

    Defaults are greedy (`chat(sampling=False, num_beams=1)`); `num_beams=N` is beam search, `sampling=True` uses
    chat's sampling defaults; `overrides` change those keys (e.g. `temperature`) and may set `generate_answers`'
    `fast` (default: FastDecoder on a GPU for greedy and sampled answers) or `min_new_tokens`. A result is a dict with `id`,
    `turn`, `question`, `prediction`, `reference` (a string, or the list of answers), one value per metric,
    `finish_reason`, `prompt_tokens`, `generated_tokens`, `error` (None, or why the row could not run) and `index`
    (the sample's position in the data).
    `skip` holds keys (`row_key` of written rows) not to run again (resume). `strict=True` raises PredictionError at the first bad row.
    `spec` reads the samples' format as a training dataset entry would (`formats.format_spec`; default: detected).
    Results come batch by batch; with `batch_size > 1` the batches are grouped by prompt size
    (`grouped_by_prompt_size`), so the order is the input's only within each size group.
    """
    if isinstance(samples, (str, os.PathLike)):
        base_dir = images_base_dir(samples)
        samples = read_sample_file(samples)
    done = set(skip)
    todo = [r for r in _as_requests(samples, base_dir, turns, spec) if r.key not in done]
    yield from _predict_requests(
        model,
        processor_or_tokenizer,
        todo,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        num_beams=num_beams,
        metrics=metrics,
        max_inp_length=max_inp_length,
        strict=strict,
        **overrides,
    )


def _as_requests(samples, base_dir, turns, spec) -> list[Request]:
    samples = list(samples)
    if samples and all(isinstance(s, Request) for s in samples):
        return samples
    return list(requests_from_samples(samples, base_dir, turns, spec=spec))


def _processor(model, processor_or_tokenizer) -> MiniCPMVProcessor:
    if isinstance(processor_or_tokenizer, MiniCPMVProcessor):
        return processor_or_tokenizer
    return MiniCPMVProcessor.from_config(processor_or_tokenizer, model.config)


def _predict_requests(
    model,
    processor_or_tokenizer,
    requests: list[Request],
    *,
    batch_size,
    max_new_tokens,
    sampling,
    num_beams,
    metrics,
    max_inp_length,
    strict,
    **overrides,
) -> Iterator[dict]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    metrics = parse_metrics(metrics)
    processor = _processor(model, processor_or_tokenizer)
    if batch_size > 1:
        requests = grouped_by_prompt_size(requests, processor, batch_size)
        LOG.info(
            f"predict: {len(requests)} requests in batches of {batch_size}, grouped by prompt size within windows of {GROUP_WINDOW_BATCHES} batches"
        )
    settings = dict(sampling=sampling, max_new_tokens=max_new_tokens, max_inp_length=max_inp_length, **overrides)
    if not sampling:
        settings["num_beams"] = num_beams
    was_training = getattr(model, "training", False)
    model.eval()
    batches = [requests[start : start + batch_size] for start in range(0, len(requests), batch_size)]
    try:
        # Threads read the pictures and run the processor for the next batches while the model answers this
        # one (PIL and torch release the GIL), so the GPU does not wait for JPEG decoding and slicing.
        with ThreadPoolExecutor(max_workers=PREFETCH_BATCHES, thread_name_prefix="predict-inputs") as pool:
            ahead = PREFETCH_BATCHES + 1
            pending = deque(pool.submit(_prepare_batch, processor, batch, max_inp_length) for batch in batches[:ahead])
            _reserve_for_run(model, processor, requests, batch_size, settings)  # while the first batches are made
            waited = 0.0  # the model's thread waiting for prepared inputs: where the CPU, not the model, sets the pace

            def next_prepared() -> _PreparedBatch:
                nonlocal waited
                start = time.perf_counter()
                prepared = pending.popleft().result()
                waited += time.perf_counter() - start
                return prepared

            for batch in batches[ahead:]:
                yield from _answer_batch(model, processor, next_prepared(), settings, metrics, strict)
                pending.append(pool.submit(_prepare_batch, processor, batch, max_inp_length))
            while pending:
                yield from _answer_batch(model, processor, next_prepared(), settings, metrics, strict)
            LOG.info(f"predict: the model waited {waited:.2f} s in all for its batches' inputs (pictures read, sliced and tokenized)")
    finally:
        model.train(was_training)


def _reserve_for_run(model, processor: MiniCPMVProcessor, requests: Sequence[Request], batch_size: int, settings: dict) -> None:
    """Size the decoder's cache for the run's longest prompt before the first batch: batches come smallest first,
    and each larger one would otherwise grow it and compile again (about a minute each on a GPU)."""
    greedy_or_sampled = settings["sampling"] or settings["num_beams"] == 1
    if not (greedy_or_sampled and decodes_fast(model, greedy_or_sampled, settings.get("fast"))):
        return  # no FastDecoder cache to size: nothing is tokenized for it
    longest = min(longest_prompt(requests, processor), settings["max_inp_length"])
    if longest:
        rows, positions = min(batch_size, len(requests)), longest + settings["max_new_tokens"]
        reserve_decoding(model, rows, positions)
        LOG.info(f"predict: decoding sized for {rows} rows of up to {positions} positions (the longest prompt: {longest} tokens)")


def grouped_by_prompt_size(requests: Sequence[Request], processor: MiniCPMVProcessor, batch_size: int) -> list[Request]:
    """`requests` reordered so that a batch holds prompts of similar length: within each window of
    `GROUP_WINDOW_BATCHES` batches, sorted (stably) by the images the vision tower encodes, which make up most of a
    multimodal prompt (`query_num` + 2 tokens each), then by the conversation's length in characters. A batch is
    padded to its longest prompt, so mixed sizes spend the prefill on padding (16 mixed pictures: rows padded to
    680 tokens for a mean of 376, benchmarks/RESULTS.md). Rows that failed their checks sort first. (Smallest
    first: the first batch is ready soonest. Largest first, one H100 measured 1,303.5 tokens/s against 1,525.8.)"""

    def size(request: Request) -> tuple[int, int]:
        if request.error:
            return (0, 0)
        sizes = _picture_sizes(request)
        return (len(request.images) if sizes is None else _vision_images(processor, sizes), _characters(request))

    window = batch_size * GROUP_WINDOW_BATCHES
    return [request for start in range(0, len(requests), window) for request in sorted(requests[start : start + window], key=size)]


def longest_prompt(requests: Sequence[Request], processor: MiniCPMVProcessor) -> int:
    """Tokens of the longest prompt among `requests` whose pictures' sizes are known (0: none), tokenized for the
    `CACHE_CANDIDATES` longest by an estimate (vision images x (`query_num` + 2) + characters). A longer prompt that
    the estimate misses only grows the decoder's cache when its batch comes (one more compilation on a GPU)."""
    per_image = processor.query_num + 2
    known = [(request, sizes) for request in requests if not request.error and (sizes := _picture_sizes(request)) is not None]

    def estimate(pair) -> int:
        request, sizes = pair
        return per_image * _vision_images(processor, sizes) + _characters(request)

    lengths = []
    for request, sizes in heapq.nlargest(CACHE_CANDIDATES, known, key=estimate):
        try:
            lengths.append(len(processor.prompt_ids(request.conversation, sizes)))
        except InvalidInputError:
            pass  # its row reports it
    return max(lengths, default=0)


def _picture_sizes(request: Request) -> list | None:
    """(width, height) of each of the request's pictures, from the sample check or in-memory images; None if unknown."""
    sizes = request.image_sizes or [im.size for im in request.images if isinstance(im, Image.Image)]
    return sizes if len(sizes) == len(request.images) else None


def _vision_images(processor: MiniCPMVProcessor, sizes: Sequence[tuple[int, int]]) -> int:
    """Images the vision tower encodes for pictures of these sizes (each one's source and its cells)."""
    return sum(processor.layout(size).num_images for size in sizes)


def _characters(request: Request) -> int:
    return sum(len(msg["content"]) for msg in request.conversation)


@dataclass
class _PreparedBatch:
    errors: list[tuple[Request, str]]  # rows that cannot run, with the reason
    ready: list[tuple[Request, list]]  # the others, with their loaded pictures
    inputs: object = None  # the processor's CPU output for `ready` (None: it failed; the rows are then retried one by one)


def _prepare_batch(processor: MiniCPMVProcessor, requests: Sequence[Request], max_inp_length: int) -> _PreparedBatch:
    prepared = _PreparedBatch([], [])
    rows, pixels = [], []
    for request in requests:
        loaded, error = (None, request.error) if request.error else _prepare(processor, request, max_inp_length)
        if error:
            prepared.errors.append((request, error))
            continue
        images, ids, row_pixels = loaded
        prepared.ready.append((request, images))
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        pixels.append(row_pixels)
    if prepared.ready:
        try:  # the processor's batch of the rows tokenized (once) and measured above
            names = [f"sample {r.id!r} turn {r.turn}" for r, _ in prepared.ready]
            inputs = processor.batch(rows, pixels, padding_side="left", names=names)
        except (InvalidInputError, RuntimeError, ValueError, OSError):
            return prepared  # _run_batch finds the failing row and reports it
        if torch.cuda.is_available() and inputs.get("pixel_values"):
            # Pinned here, off the model's thread, the stacks' copy to the GPU is only queued there (moving a batch
            # of 16's ~200 MB of pixels took that thread 43 ms at the median: profiling/profile_predict_batch.py).
            inputs["pixel_values"] = [stack.pin_memory() for stack in inputs["pixel_values"]]
        prepared.inputs = inputs
    return prepared


def _answer_batch(model, processor, prepared: _PreparedBatch, settings: dict, metrics, strict: bool) -> Iterator[dict]:
    for request, error in prepared.errors:
        yield _checked(_error_row(request, error, metrics), strict)
    if prepared.ready:
        yield from (_checked(row, strict) for row in _run_batch(model, processor, prepared.ready, settings, metrics, prepared.inputs))


def _checked(row: dict, strict: bool) -> dict:
    if strict and row["error"]:
        raise PredictionError(row["error"])
    return row


def _prepare(processor: MiniCPMVProcessor, request: Request, max_inp_length: int) -> tuple[tuple | None, str | None]:
    """Load the pictures, tokenize the prompt (refusing one over `max_inp_length`) and make the pixels before
    batching, so an error belongs to its row: `(pictures, prompt ids, pixels)`, or the reason."""
    where = f"sample {request.id!r} turn {request.turn}"
    try:
        images = [
            load_image(im, what=f"image {str(im)!r}" if isinstance(im, (str, Path)) else f"image {k}")
            for k, im in enumerate(request.images)
        ]
    except InvalidInputError as err:
        return None, f"{where}: {err}"
    try:
        ids, pixels = processor.inference_inputs(request.conversation, images, max_inp_length)
    except InvalidInputError as err:  # the prompt's: it is made (and refused) before any pixels
        return None, f"{where}: {err}"
    except (RuntimeError, ValueError, OSError) as err:  # the pixels'
        return None, f"{where}: cannot make the pictures' pixels: {type(err).__name__}: {err}"
    return (images, ids, pixels), None


def _run_batch(model, processor, batch: list[tuple[Request, list]], settings: dict, metrics, inputs=None) -> list[dict]:
    try:
        answers = generate_answers(
            model, processor, [r.conversation for r, _ in batch], [ims for _, ims in batch], inputs=inputs, **settings
        )
    except (InvalidInputError, RuntimeError, ValueError, OSError) as err:
        if len(batch) > 1:  # find the row that fails: each one alone
            return [row for one in batch for row in _run_batch(model, processor, [one], settings, metrics)]
        request = batch[0][0]
        return [_error_row(request, f"sample {request.id!r} turn {request.turn}: generation failed: {type(err).__name__}: {err}", metrics)]
    rows = []
    for (request, _), answer in zip(batch, answers):
        rows.append(
            {
                "id": request.id,
                "turn": request.turn,
                "index": request.index,
                "question": request.question,
                "prediction": answer.text,
                "reference": request.references[0] if len(request.references) == 1 else request.references,
                **score(answer.text, request.references, metrics),
                "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens,
                "generated_tokens": len(answer.token_ids),
                "error": None,
            }
        )
    return rows


def _error_row(request: Request, error: str, metrics) -> dict:
    reference = (request.references[0] if len(request.references) == 1 else request.references) if request.references else None
    return {
        "id": request.id,
        "turn": request.turn,
        "index": request.index,
        "question": request.question,
        "prediction": None,
        "reference": reference,
        **{name: None for name in metrics},
        "finish_reason": None,
        "prompt_tokens": None,
        "generated_tokens": None,
        "error": error,
    }


# ------------------------------------------------------------------ output file, resume and summary


class PredictionsFile:
    """The `--out` JSONL: one whole line per result, each written with one `write` and flushed at once.

    `resume=True` keeps the rows already there (a line cut by a kill is removed) and reports their keys;
    otherwise an existing non-empty file is refused unless `overwrite=True`.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise PredictionError(
                f"--out {str(self.path)!r} already holds predictions: pass --resume to finish it, or --overwrite to start again"
            )
        if exists and resume:
            self._drop_partial_line()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if overwrite and not resume else 0)
        self._fd = os.open(self.path, flags, 0o644)
        self.done = {row_key(row) for row in read_predictions(self.path)} if resume else set()

    def _drop_partial_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            LOG.warning(f"{self.path}: removing an incomplete last line ({len(data) - keep} bytes) left by an interrupted run")
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def write(self, row: dict) -> None:
        os.write(self._fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The rows of a predictions file, one per `row_key` (a later row replaces an earlier one)."""
    rows: dict[tuple, dict] = {}
    for line in _lines(Path(path).read_text(encoding="utf-8")):
        if line.strip():
            row = json.loads(line)
            rows[row_key(row)] = row
    return list(rows.values())


def summarize(rows: Sequence[dict], metrics: Sequence[str]) -> dict:
    """Counts and each metric's mean over the rows that ran (failed rows are counted, not scored). A metric that an
    earlier run did not write (`--resume` with other `--metrics`) is computed from its rows' prediction and reference."""
    ok = [row for row in rows if not row.get("error")]

    def value(row: dict, name: str) -> float:
        if name in row:
            return row[name]
        reference = row["reference"]
        return score(row["prediction"], reference if isinstance(reference, list) else [reference], [name])[name]

    means = {name: round(sum(value(row, name) for row in ok) / len(ok), 4) if ok else None for name in metrics}
    return {
        "predictions": len(rows),
        "samples": len({row["id"] for row in rows}),
        "failed": len(rows) - len(ok),
        "metrics": means,
    }


def summary_line(summary: dict, out: str | os.PathLike) -> str:
    scores = ", ".join(f"{k} {v:.3f}" for k, v in summary["metrics"].items() if v is not None) or "no scores"
    run = summary.get("run", {})
    speed = (
        f" in {run['elapsed_s']:.1f} s ({run['samples_per_s']:.2f} samples/s, {run['generated_tokens_per_s']:.1f} tokens/s)" if run else ""
    )
    return (
        f"predict: {summary['predictions']} predictions of {summary['samples']} samples, {summary['failed']} failed; "
        f"{scores}{speed} -> {out}"
    )


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("axolotl-minicpmv", "torch", "transformers", "peft", "axolotl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ------------------------------------------------------------------ the command


def load_predictor(
    model_path: str, adapter: str | None = None, device: str | None = None, dtype: str | None = None, max_slice_nums: int | None = None
):
    """(model in eval mode on `device`, processor) for a base model (+ adapter)."""
    from ..inference.chat_helper import pick_device, resolve_dtype
    from ..model.tokenization import load_tokenizer
    from ..weights.loading import load_model

    device = device or pick_device()
    torch_dtype = resolve_dtype(dtype, device)
    model = load_model(model_path, adapter=adapter, dtype=torch_dtype).to(device).eval()
    processor = MiniCPMVProcessor.from_config(load_tokenizer(model_path), model.config, max_slice_nums=max_slice_nums)
    return model, processor


def run_prediction(
    *,
    data: str,
    out: str,
    model_path: str | None = None,
    adapter: str | None = None,
    source: str | None = None,
    checkpoint: str | None = None,
    metrics_out: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    sampling: bool = False,
    num_beams: int = 1,
    metrics: str | Sequence[str] | None = None,
    turns: str = "last",
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    max_inp_length: int = 2048,
    max_slice_nums: int | None = None,
    seed: int | None = None,
    command: str | None = None,
    progress: bool | None = None,
) -> dict:
    """What `minicpmv-predict` does: load, predict into `out`, summarise (also into `metrics_out`); returns the summary.

    `source` is an Axolotl run (its YAML or output_dir): its base model (unless `model_path`), trained adapter (or
    `checkpoint`) and `minicpmv_max_slice_nums` are used.
    """
    metric_names = parse_metrics(metrics)
    spec = image_root = None
    if source is not None:
        from ..weights.export import ExportError, resolve_run

        try:
            run = resolve_run(source, checkpoint=checkpoint, base_model=model_path)
        except (ExportError, FileNotFoundError) as err:
            raise PredictionError(str(err)) from None
        model_path, adapter = run.base_model, str(run.adapter_dir)
        if max_slice_nums is None and run.axolotl_config:
            max_slice_nums = run.axolotl_config.get("minicpmv_max_slice_nums")
        spec, image_root = _run_dataset_settings(run.axolotl_config or {}, data)
    if not model_path:
        raise PredictionError("no model: pass --model DIR (and --adapter DIR), or an Axolotl run (CONFIG.yml or its output_dir)")
    samples = read_sample_file(data)
    requests = list(requests_from_samples(samples, images_base_dir(data), turns, source=str(data), spec=spec, image_root=image_root))
    if limit is not None:
        requests = requests[:limit]
    with PredictionsFile(out, resume=resume, overwrite=overwrite) as predictions:
        todo = [r for r in requests if r.key not in predictions.done]
        if predictions.done:
            LOG.info(f"{out}: resuming: {len(requests) - len(todo)} of {len(requests)} predictions already written")
        LOG.info(f"loading {model_path}" + (f" with adapter {adapter}" if adapter else ""))
        model, processor = load_predictor(model_path, adapter, device, dtype, max_slice_nums)
        if seed is not None:
            torch.manual_seed(seed)
        start, tokens, written = time.perf_counter(), 0, 0
        bar = _Progress(len(todo), progress)
        try:
            for row in _predict_requests(
                model,
                processor,
                todo,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                num_beams=num_beams,
                metrics=metric_names,
                max_inp_length=max_inp_length,
                strict=False,
            ):
                predictions.write(row)
                written += 1
                tokens += row["generated_tokens"] or 0
                bar.update(row)
                if strict and row["error"]:
                    raise PredictionError(row["error"])
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
    wanted = {r.key for r in requests}
    summary = summarize([row for row in read_predictions(out) if row_key(row) in wanted], metric_names)
    summary["run"] = {
        "predictions_this_run": written,
        "resumed_from": len(requests) - len(todo),
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(written / elapsed, 3) if elapsed > 0 else 0.0,
        "generated_tokens": tokens,
        "generated_tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
    }
    summary.update(
        data=str(data),
        out=str(out),
        model=model_path,
        adapter=adapter,
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        generation={
            "sampling": sampling,
            "num_beams": None if sampling else num_beams,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "turns": turns,
            "max_slice_nums": processor.image_processor.max_slice_nums,
        },
        command=command or " ".join(sys.argv),
        versions=versions(),
    )
    if metrics_out:
        Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _run_dataset_settings(axolotl_config: dict, data: str) -> tuple[FormatSpec | None, str | None]:
    """How the run's config reads `data`: the `minicpmv_format` and field mappings of the dataset entry that names that
    file (test datasets first; None, formats detected per sample, when none does), and the `minicpmv_image_root` of
    that entry or of the config."""
    from .data import is_minicpmv_dataset
    from .formats import format_spec

    wanted = Path(data).expanduser().resolve()
    image_root = axolotl_config.get("minicpmv_image_root")
    for key in ("test_datasets", "datasets"):
        for ds_cfg in axolotl_config.get(key) or []:
            path = ds_cfg.get("path") if isinstance(ds_cfg, dict) else None
            if path and is_minicpmv_dataset(ds_cfg) and Path(str(path)).expanduser().resolve() == wanted:
                spec = format_spec(ds_cfg, axolotl_config)
                image_root = ds_cfg.get("minicpmv_image_root") or image_root
                LOG.info(f"predict: {data} is read with the run's {key} entry for it: {spec}, image root {image_root}")
                return spec, image_root
    return None, image_root


class _Progress:
    """tqdm bar (samples/s, ETA) on a terminal; a log line every 10 s otherwise."""

    def __init__(self, total: int, progress: bool | None):
        self.total, self.count, self.failed = total, 0, 0
        self.start = self.last = time.perf_counter()
        interactive = sys.stderr.isatty() if progress is None else progress
        self.bar = None
        if interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="predict", file=sys.stderr)

    def update(self, row: dict) -> None:
        self.count += 1
        self.failed += bool(row["error"])
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed)
            return
        now = time.perf_counter()
        if now - self.last >= 10 or self.count == self.total:
            self.last = now
            rate = self.count / (now - self.start) if now > self.start else 0.0
            eta = (self.total - self.count) / rate if rate else float("nan")
            LOG.info(f"predict: {self.count}/{self.total} ({self.failed} failed), {rate:.2f} samples/s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
