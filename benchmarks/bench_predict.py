"""Prediction speed of MiniCPM-V 2.0 at the real size (random bf16 weights) on one GPU, through `predict()`.

200 samples (default) with pictures of mixed sizes from 448x448 to 1344x1344 (so 1 to 10 vision images each) and a
one-sentence question, answered in batches of --batch-size with exactly --new-tokens generated tokens each (forced
through the model's generation config: min_new_tokens = max_new_tokens). Reports generated tokens/s and samples/s of
the whole run (image loading, slicing, vision tower, prefill and decoding; after one warm-up batch) and peak GPU
memory. The issue's target: at least 1,500 generated tokens/s (about 23 samples/s) at batch 16 on one H200, within
20 GiB. Speed does not depend on the weights' values when the token counts are fixed.

    python benchmarks/bench_predict.py [--batch-size 16] [--samples 200] [--new-tokens 64] [--out benchmarks/results.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_chat import bench_model, picture
from results_table import record, versions

from axolotl_minicpmv.integration.predict import predict

SIZES = [(448, 448), (672, 448), (448, 672), (896, 672), (896, 896), (1344, 896), (896, 1344), (1344, 1344)]
QUESTION = "What is shown in this picture?"


def make_samples(folder: Path, count: int, seed: int = 0) -> list[dict]:
    """`count` samples over JPEG files of SIZES (each size written once), sizes drawn at random (seeded)."""
    files = {}
    for width, height in SIZES:
        path = folder / f"{width}x{height}.jpg"
        picture(width, height).save(path, quality=90)
        files[(width, height)] = str(path)
    rng = random.Random(seed)
    return [
        {
            "id": f"bench-{i:04d}",
            "image": files[rng.choice(SIZES)],
            "conversations": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "A picture."}],
        }
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.jsonl")))
    args = parser.parse_args()
    # predict's own log lines (how long the model waited for prepared inputs, the cache it reserved) in the output
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("axolotl_minicpmv.predict").setLevel(logging.INFO)

    model, _, processor = bench_model(args.attn)
    samples = make_samples(Path(tempfile.mkdtemp()), args.samples)
    # min_new_tokens: every answer is exactly --new-tokens long
    settings = {"batch_size": args.batch_size, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "metrics": ["exact"]}

    warmup = time.perf_counter()
    list(predict(model, processor, samples[: args.batch_size], **settings))  # warm-up: compilation, kernels, allocator
    warmup = time.perf_counter() - warmup
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rows = list(predict(model, processor, samples, **settings))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    failed = [row["error"] for row in rows if row["error"]]
    assert not failed, failed[:3]
    tokens = sum(row["generated_tokens"] for row in rows)
    assert all(row["generated_tokens"] == args.new_tokens for row in rows), {row["generated_tokens"] for row in rows}
    record(
        {
            "bench": "predict",
            "gpu": torch.cuda.get_device_name(),
            "date": date.today().isoformat(),
            "versions": versions("torch", "transformers", "timm"),
            "attn": args.attn,
            "command": "python " + " ".join(sys.argv),
            "samples": len(rows),
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "decoding": "FastDecoder" if getattr(model, "_fast_decoder", None) is not None else "generate",
            "warmup_batch_s": round(warmup, 1),
            "elapsed_s": round(elapsed, 2),
            "samples_per_s": round(len(rows) / elapsed, 2),
            "generated_tokens_per_s": round(tokens / elapsed, 1),
            "prompt_tokens_mean": round(sum(row["prompt_tokens"] for row in rows) / len(rows), 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        },
        Path(args.out),
    )


if __name__ == "__main__":
    main()
