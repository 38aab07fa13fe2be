"""Where a `predict()` batch's time goes (real size, random bf16 weights, one GPU; bench_predict.py's samples).

For a few batches of --batch-size samples (448x448 to 1344x1344 pictures, 64 forced new tokens), formed as predict
forms them (grouped by prompt size), it times, each stage synchronised: preparing the batch on the CPU (pictures,
slicing, pixels, prompt ids: what the prefetch threads do), moving it to the GPU, the vision tower + resampler +
embedding (all sizes packed in one pass as predict runs them, and per image size through the compiled tower
blocks), the prefill (FastDecoder's first token) and the decoding of the other 63 tokens (the block-sparse mask
as shipped, and SDPA's dense one); and next to them a whole `predict()` over the same batches. Prints one JSON
line per batch and the medians.

    python benchmarks/profiling/profile_predict_batch.py [--batch-size 16] [--batches 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat, bench_predict

from bench_chat import bench_model  # noqa: E402
from bench_predict import make_samples  # noqa: E402

from axolotl_minicpmv.inference.chat import init_fast_path  # noqa: E402
from axolotl_minicpmv.inference.fast_decoding import FastDecoder  # noqa: E402
from axolotl_minicpmv.integration.predict import _as_requests, _prepare_batch, grouped_by_prompt_size, predict  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import move_inputs  # noqa: E402

EMBED_KEYS = ("input_ids", "pixel_values", "vision_order", "image_bound")


def seconds(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer, processor = bench_model()
    samples = make_samples(Path(tempfile.mkdtemp()), args.batch_size * (args.batches + 1))
    settings = {"batch_size": args.batch_size, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    warm = time.perf_counter()
    list(predict(model, processor, samples[: args.batch_size], metrics=["exact"], **settings))  # compilation
    print(json.dumps({"warm_up_s": round(time.perf_counter() - warm, 1)}), flush=True)
    init_fast_path(model)
    decoder = model._fast_decoder
    # The same step through SDPA's dense mask (every cache position of every row), for comparison.
    dense = FastDecoder(model, block_sparse=False)
    rows = []
    # The batches as predict forms them, grouped by prompt size. Batch 0 (the smallest prompts) runs everything once
    # untimed: the per-size compiled tower blocks compile there (predict packs), and each decoder's loop for these
    # settings is recorded on first use.
    ordered = grouped_by_prompt_size(_as_requests(samples, ".", "last"), processor, args.batch_size)
    for b in range(0, args.batches + 1):
        requests = ordered[b * args.batch_size : (b + 1) * args.batch_size]
        prepare_s, prepared = seconds(lambda: _prepare_batch(processor, requests, 2048))
        move_s, batch = seconds(lambda: move_inputs(prepared.inputs, model.device))
        with torch.inference_mode():
            per_size_s, embeds = seconds(lambda: model.embed_inputs(*(batch[k] for k in EMBED_KEYS), encode=model._fast_encode_stacks))
            packed_s, packed = seconds(lambda: model.embed_inputs(*(batch[k] for k in EMBED_KEYS)))
            vision_diff = ((packed - embeds).norm() / embeds.norm()).item()

            def decode(n, with_decoder=decoder):
                return with_decoder.generate(
                    embeds, n, eos_token_id=tokenizer.eos_token_id, min_new_tokens=n, attention_mask=batch["attention_mask"]
                )

            prefill_s, _ = seconds(lambda: decode(1))
            full_s, tokens = seconds(lambda: decode(args.new_tokens))
            dense_prefill_s, _ = seconds(lambda: decode(1, dense))
            dense_full_s, dense_tokens = seconds(lambda: decode(args.new_tokens, dense))
        predict_s, _ = seconds(lambda: list(predict(model, processor, requests, metrics=["exact"], **settings)))
        if b == 0:
            continue
        mask = batch["attention_mask"]
        rows.append(
            {
                "batch": b,
                "images": sum(len(p) for p in batch["pixel_values"]),
                "stacks": len(batch["pixel_values"]),
                "prompt_tokens_max": mask.shape[1],
                "prompt_tokens_mean": round(mask.sum().item() / mask.shape[0], 1),
                "prepare_cpu_ms": round(1e3 * prepare_s, 1),
                "to_gpu_ms": round(1e3 * move_s, 1),
                "vision_packed_ms": round(1e3 * packed_s, 1),
                "vision_per_size_ms": round(1e3 * per_size_s, 1),
                "vision_relative_diff": round(vision_diff, 5),
                "prefill_ms": round(1e3 * prefill_s, 1),
                "decode_ms": round(1e3 * (full_s - prefill_s), 1),
                "decode_dense_ms": round(1e3 * (dense_full_s - dense_prefill_s), 1),
                "same_tokens_as_dense": round((tokens == dense_tokens).float().mean().item(), 4),
                "predict_whole_ms": round(1e3 * predict_s, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "batch"}
    print(json.dumps({"median": medians, "gpu": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
