"""Serving speed of `minicpmv-serve` at the real size (random bf16 weights) on one GPU, through HTTP.

A server process (the real app: `serving.api.create_app` + `Scheduler`, uvicorn on 127.0.0.1) runs the
real-size model of bench_chat.py; this process is the load: 1, 8 and 32 concurrent streaming clients, each
sending greedy requests with its own random 448x448 image and asking for 128 new tokens. Reported per
level: requests/s, generated tokens/s, time to first token (first content chunk) p50/p95, latency p50/p95.
Goals (issue 17): at 32 clients >= 6x the tokens/s of one client; TTFT p50 at one client <= 60 ms.

    python benchmarks/bench_serve.py [--clients 1 8 32] [--requests-per-client 4] [--max-batch-size 32]
        [--out benchmarks/results.jsonl]

Random weights could end answers early: requests set `min_tokens` = `max_tokens` (vLLM's extra field), so
every answer is 128 tokens long; the mean completion length is recorded to show it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import statistics
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "plugin"))
sys.path.insert(0, str(HERE))


def _serve(port: int, max_batch_size: int, max_queue: int, ready, tiny: bool = False) -> None:
    """The server process: the real-size random model (with --tiny, the tests' tiny one on CPU) behind the real app."""
    import tempfile

    import torch
    import uvicorn
    from bench_chat import bench_model

    from axolotl_minicpmv import MiniCPMV, MiniCPMVProcessor
    from axolotl_minicpmv.serving.api import ServerSettings, create_app
    from axolotl_minicpmv.serving.scheduler import Scheduler
    from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

    if tiny:  # a smoke run of this script without a GPU
        checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", dtype=torch.float32)
        model = MiniCPMV.from_pretrained(checkpoint, dtype=torch.float32).eval()
        processor = MiniCPMVProcessor.from_pretrained(checkpoint)
    else:
        model, _, processor = bench_model()
    scheduler = Scheduler(model, processor, max_batch_size=max_batch_size, max_queue=max_queue)
    scheduler.warm_up()  # as `minicpmv-serve` does: compiles the fast path on a GPU before the first client
    app = create_app(scheduler, ServerSettings(model_name="bench", ui=False))
    ready.set()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _image_url(seed: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def request_body(image: str, new_tokens: int) -> dict:
    """The benchmark's request: a greedy streamed answer of exactly `new_tokens` tokens about one picture."""
    return {
        "model": "bench",
        "temperature": 0,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is shown in this picture?"}],
            }
        ],
    }


async def _one(client, url: str, image: str, new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content chunk, seconds to the end, completion tokens) of one streamed request."""
    body = request_body(image, new_tokens)
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _level(url: str, clients: int, per_client: int, new_tokens: int, images: list[str]) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(k: int):
            return [await _one(client, url, images[(k * per_client + i) % len(images)], new_tokens) for i in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(k) for k in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttft, latency, tokens = [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_completion_tokens": round(statistics.mean(tokens), 1),
        "ttft_ms_p50": round(1000 * _pct(ttft, 0.5), 1),
        "ttft_ms_p95": round(1000 * _pct(ttft, 0.95), 1),
        "latency_s_p50": round(_pct(latency, 0.5), 3),
        "latency_s_p95": round(_pct(latency, 0.95), 3),
    }


def _wait_until_serving(server, ready, health_url: str, timeout_s: float) -> None:
    """Until the server answers /health; a server process that died (an import error, say) stops the benchmark at once."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise SystemExit(f"the server process exited with code {server.exitcode} before serving (its traceback is above)")
        if ready.wait(timeout=1):
            try:
                if httpx.get(health_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
    raise SystemExit(f"the server did not answer {health_url} within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--port", type=int, default=18777)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoint on CPU: checks the script, measures nothing")
    parser.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = parser.parse_args()

    import httpx
    import torch
    from results_table import record, versions

    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    server = context.Process(target=_serve, args=(args.port, args.max_batch_size, 4 * max(args.clients), ready, args.tiny), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{args.port}"
    try:
        _wait_until_serving(server, ready, base + "/health", timeout_s=600)
        url = base + "/v1/chat/completions"
        images = [_image_url(seed) for seed in range(64)]
        asyncio.run(_level(url, 2, 1, args.new_tokens, images))  # warm-up (first CUDA kernels, allocator)
        levels = [asyncio.run(_level(url, n, args.requests_per_client, args.new_tokens, images)) for n in args.clients]
        health = httpx.get(base + "/health", timeout=5).json()
    finally:
        server.terminate()
        server.join(timeout=30)
    result = {
        "bench": "serve",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": date.today().isoformat(),
        "versions": versions("torch", "transformers", "timm", "fastapi", "uvicorn"),
        "command": "python " + " ".join(sys.argv),
        "new_tokens": args.new_tokens,
        "image": "448x448",
        "max_batch_size": args.max_batch_size,
        "levels": levels,
        "largest_batch": health.get("largest_batch"),
        "warm_up_s": health.get("warm_up_s"),  # the server's compilation before its first client
        **({"note": "--tiny smoke run (tiny checkpoint, CPU): not a measurement"} if args.tiny else {}),
    }
    by_clients = {level["clients"]: level for level in levels}
    if 1 in by_clients and 32 in by_clients:
        result["tokens_per_s_32_over_1"] = round(by_clients[32]["tokens_per_s"] / by_clients[1]["tokens_per_s"], 2)
    record(result, Path(args.out))


if __name__ == "__main__":
    main()
