"""Decode-step compile options on one GPU: what FastDecoder ships (coordinate-descent tuning + freezing) against
other inductor options.

Real size, random bf16 weights, a 448x448 chat prompt at batch 1. For each option set: decode tokens/s
over 256 new tokens (FastDecoder: static cache + CUDA graph), peak memory, the first 8 greedy tokens,
then a torch.profiler pass over 10 un-graphed steps: GPU kernel time and kernels per step and the 14
kernels that take the most time. Measured 2026-11-25: coordinate-descent tuning alone 277.7 tokens/s, with
freezing 302.7 (shipped). Not yet measured: combo kernels (independent kernels such as the q/k/v and gate/up
products, which read the same input, launched as one) and aggressive fusion; their extra memory and compile
time are part of what to measure.

    python benchmarks/profiling/compare_decode_compile.py [--variants shipped combo aggressive]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profiler_counts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat

from bench_chat import bench_model, picture, prompt_embeds, timed  # noqa: E402

from axolotl_minicpmv.inference.fast_decoding import FastDecoder, _decode_forward  # noqa: E402

NEW_TOKENS = 256
SHIPPED = {"coordinate_descent_tuning": True, "freezing": True}
VARIANTS = {
    "cdt": {"coordinate_descent_tuning": True},
    "shipped": SHIPPED,
    "combo": {**SHIPPED, "combo_kernels": True},
    "aggressive": {**SHIPPED, "aggressive_fusion": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["shipped", "combo", "aggressive"], choices=list(VARIANTS))
    args = parser.parse_args()
    model, _, processor = bench_model()
    embeds, _ = prompt_embeds(model, processor, picture(448, 448), 1)
    for name in args.variants:
        options = VARIANTS[name]
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        decoder = FastDecoder(model)
        decoder._forward = torch.compile(_decode_forward, fullgraph=True, dynamic=False, options=options)
        start = time.perf_counter()
        with torch.inference_mode():
            first = timed(lambda: decoder.generate(embeds, 1), 3)
            full = timed(lambda: decoder.generate(embeds, NEW_TOKENS), 3)
        out = decoder.generate(embeds, 64)
        print(
            json.dumps(
                {
                    "variant": name,
                    "tok_s": round((NEW_TOKENS - 1) / (full - first), 1),
                    "wall_incl_compile_s": round(time.perf_counter() - start, 1),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "first_tokens": out[0, :8].tolist(),
                }
            ),
            flush=True,
        )

        loop = next(iter(decoder._slot(1).loops.values()))
        with torch.inference_mode():
            loop.start(torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))
            for _ in range(3):
                loop.decode_one()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    loop.decode_one()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        print(
            json.dumps(
                {
                    "variant": name,
                    "kernel_us_per_step": round(sum(e.self_device_time_total for e in events) / 10, 1),
                    "kernels_per_step": sum(e.count for e in events) / 10,
                }
            ),
            flush=True,
        )
        for event in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            print(
                json.dumps({"k": event.key[:90], "us_per_step": round(event.self_device_time_total / 10, 1), "n": event.count / 10}),
                flush=True,
            )


if __name__ == "__main__":
    main()
