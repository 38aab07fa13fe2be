"""Where a lone streamed request's first token goes in `minicpmv-serve` (real size, random bf16 weights, one GPU).

bench_serve.py measures the first token through HTTP at about 64 ms for a 448x448 picture, where
`chat(fast=True)` in process takes 16-18 ms. This script splits the server's path into its stages, each timed
alone (median of --runs, synchronised), in the order a request meets them:

  parse         json.loads of the body (a base64 PNG of about 800 KB) and `parse_chat_request`
  open_image    base64 + PNG decoding of the data URL
  prepare       `api._prepare`: the picture opened, the prompt ids and pixels made (the request's thread)
  to_gpu        `processor.batch` + `move_inputs` (the model's thread)
  vision        `embed_inputs` through the compiled tower blocks the scheduler uses, and through
                `chat(fast=True)`'s CUDA-graphed tower, for comparison
  first_token   `generate_answers(inputs=..., max_new_tokens=1)`: everything of the model's thread
  scheduler     `Scheduler.submit` of a prepared Job until its first streamed text (no HTTP), for each of
                bench_serve's first --runs pictures (a random model's first token may stream no text yet)
  http          the real app under uvicorn in this process, through bench_serve's own client: the first
                content chunk for one picture again and again, and for each of its pictures

    python benchmarks/profiling/profile_serve_request.py [--runs 10] [--max-batch-size 32]

The Scheduler's warm-up time is printed first: run after bench_serve.py on the same machine, it is the start-up
of a new process whose compiled artefacts are on disk (TORCHINDUCTOR_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat, bench_serve

from bench_chat import bench_model, timed  # noqa: E402
from bench_serve import _image_url, _one, request_body  # noqa: E402

from axolotl_minicpmv.inference.chat import init_fast_path  # noqa: E402
from axolotl_minicpmv.inference.generate import generate_answers  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import move_inputs  # noqa: E402
from axolotl_minicpmv.serving import api  # noqa: E402
from axolotl_minicpmv.serving.images import open_image  # noqa: E402
from axolotl_minicpmv.serving.protocol import parse_chat_request  # noqa: E402
from axolotl_minicpmv.serving.scheduler import Job, Scheduler  # noqa: E402

NEW_TOKENS = 128


def median_ms(fn, runs: int) -> float:
    return round(1000 * timed(fn, runs, warmup=1), 2)


def scheduler_first_text_ms(scheduler: Scheduler, chat, prompt, runs: int) -> float:
    """Submit a prepared Job and wait for its first streamed text, then for its end (so the next starts alone);
    the median of `runs` after one more."""

    async def one() -> float:
        job = Job(chat, prompt, asyncio.get_running_loop())
        start = time.perf_counter()
        scheduler.submit(job)
        first = None
        while True:
            kind, _ = await job.events.get()
            if kind == "delta" and first is None:
                first = time.perf_counter() - start
            if kind in ("done", "error"):
                return first

    samples = [asyncio.run(one()) for _ in range(runs + 1)][1:]
    return round(1000 * statistics.median(samples), 2)


def http_first_chunk_ms(app, images: list[str], runs: int) -> tuple[float, list[float]]:
    """(median first content chunk of the first picture's request sent `runs` times after one more, the first
    chunk of each picture's request), through bench_serve's own client."""
    import httpx
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    while not server.started:
        time.sleep(0.05)

    async def first_chunks_ms(sent: list[str]) -> list[float]:
        async with httpx.AsyncClient(timeout=120) as client:
            return [1000 * (await _one(client, url, image, NEW_TOKENS))[0] for image in sent]

    again = asyncio.run(first_chunks_ms([images[0]] * (runs + 1)))[1:]
    by_image = asyncio.run(first_chunks_ms(images))
    server.should_exit = True
    thread.join(timeout=10)
    return round(statistics.median(again), 2), [round(ms, 1) for ms in by_image]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()

    model, _, processor = bench_model()
    scheduler = Scheduler(model, processor, max_batch_size=args.max_batch_size)
    start = time.monotonic()
    scheduler.warm_up()
    print(json.dumps({"warm_up_s": round(time.monotonic() - start, 1)}), flush=True)

    settings = api.ServerSettings(model_name="bench", ui=False)
    runs = args.runs
    images = [_image_url(seed) for seed in range(runs)]  # bench_serve's pictures; the first one for the stages
    raw = json.dumps(request_body(images[0], NEW_TOKENS)).encode()
    chat = parse_chat_request(json.loads(raw), {"bench"}, settings.max_tokens)
    (url, param), *_ = chat.image_urls
    prompt = api._prepare(chat, processor, None, settings)

    def to_gpu():
        padded = processor.batch([{"input_ids": prompt.ids, "attention_mask": [1] * len(prompt.ids)}], [prompt.pixels], padding_side="left")
        return move_inputs(padded, model.device)

    inputs = to_gpu()
    init_fast_path(model)

    def vision(encode):
        return lambda: model.embed_inputs(
            inputs["input_ids"], inputs.get("pixel_values"), inputs.get("vision_order"), inputs.get("image_bound"), encode=encode
        )

    def first_token():
        generate_answers(model, processor, [chat.conversation], inputs=to_gpu(), max_new_tokens=1, min_new_tokens=1, num_beams=1, fast=True)

    by_image = []
    for image in images:
        image_chat = parse_chat_request(request_body(image, NEW_TOKENS), {"bench"}, settings.max_tokens)
        by_image.append(scheduler_first_text_ms(scheduler, image_chat, api._prepare(image_chat, processor, None, settings), 2))
    stages = {
        "parse_ms": median_ms(lambda: parse_chat_request(json.loads(raw), {"bench"}, settings.max_tokens), runs),
        "open_image_ms": median_ms(lambda: open_image(url, param, None, settings.max_image_pixels), runs),
        "prepare_ms": median_ms(lambda: api._prepare(chat, processor, None, settings), runs),
        "to_gpu_ms": median_ms(to_gpu, runs),
        "vision_compiled_blocks_ms": median_ms(vision(model._fast_encode_stacks), runs),
        "vision_cuda_graph_ms": median_ms(vision(model._fast_encode_images), runs),
        "first_token_ms": median_ms(first_token, runs),
        "scheduler_first_text_ms": scheduler_first_text_ms(scheduler, chat, prompt, runs),
        "scheduler_first_text_ms_by_image": by_image,
    }
    # last: the app's shutdown closes the scheduler
    stages["http_first_chunk_ms"], stages["http_bench_client_ms_by_image"] = http_first_chunk_ms(
        api.create_app(scheduler, settings), images, runs
    )
    print(json.dumps({"bench": "profile_serve_request", "gpu": torch.cuda.get_device_name(), "runs": runs, **stages}), flush=True)


if __name__ == "__main__":
    main()
