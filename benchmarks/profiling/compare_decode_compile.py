"""Decode-step variants on one GPU: what FastDecoder ships (fused q/k/v and gate/up projections, compiled with
coordinate-descent tuning + freezing) against the same step unfused, other inductor options, and the eager step
recorded as a CUDA graph (`FastDecoder(compile=False)`), fused or not, and attention through the block-sparse
mask (`sparse`: only the cache blocks each row sees, `FastDecoder(block_sparse=True)`) instead of SDPA's dense one.

Real size, random bf16 weights, 448x448 chat prompts at each --batches size (the prefill runs eagerly here: only
the decoding step is measured, and nothing but the step compiles). For each variant and batch: decode tokens/s
over --new-tokens new tokens (256 by default; FastDecoder: static cache + CUDA graph), peak memory, the first 8
greedy tokens, then a torch.profiler pass over 10 un-graphed steps: GPU kernel time and kernels per step and the 14
kernels that take the most time. Measured 2026-11-25 (unfused): coordinate-descent tuning alone 277.7 tokens/s, with freezing 302.7.

    python benchmarks/profiling/compare_decode_compile.py [--variants shipped sparse unfused unpadded combo autotune recorded recorded_unfused] [--batches 1 8] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profiler_counts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat

from bench_chat import bench_model, picture, prompt_embeds, timed  # noqa: E402

from axolotl_minicpmv.inference.fast_decoding import STEP_COMPILE_OPTIONS, FastDecoder, _decode_forward, _prefill_forward  # noqa: E402

SHIPPED = STEP_COMPILE_OPTIONS
# name -> (inductor options of the compiled step, or None: the eager step recorded; what fuse_projections keeps:
# "all", "none", or "decoder": the fused q/k/v and gate/up without the padded lm_head; attention through the
# block-sparse decoding mask, or SDPA over the whole cache)
VARIANTS = {
    "shipped": (SHIPPED, "all", False),
    "sparse": (SHIPPED, "all", True),
    "unfused": (SHIPPED, "none", False),
    "unpadded": (SHIPPED, "decoder", False),
    "cdt": ({"coordinate_descent_tuning": True}, "all", False),
    "combo": ({**SHIPPED, "combo_kernels": True}, "all", False),
    "aggressive": ({**SHIPPED, "aggressive_fusion": True}, "all", False),
    # inductor benchmarks Triton templates against cuBLAS for each product (batch 8's GEMMs have 8 rows; minutes more compilation)
    "autotune": ({**SHIPPED, "max_autotune": True, "max_autotune_gemm_backends": "TRITON,ATEN"}, "all", False),
    "recorded": (None, "all", False),
    "recorded_unfused": (None, "none", False),
}


def unfuse(llm, keep: str) -> None:
    if keep != "all":
        llm.padded_head_weight = None
    if keep == "none":
        for layer in llm.model.layers:
            layer.self_attn.qkv_weight = None
            layer.mlp.gate_up_weight = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["recorded", "recorded_unfused", "shipped", "unfused"], choices=list(VARIANTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256, help="also sizes the static cache: prompt + new tokens")
    args = parser.parse_args()
    model, _, processor = bench_model()
    for batch in args.batches:
        embeds, _ = prompt_embeds(model, processor, picture(448, 448), batch)
        for name in args.variants:
            measure(model, embeds, name, batch, args.new_tokens)


def measure(model, embeds, name: str, batch: int, new_tokens: int) -> None:
    options, keep, block_sparse = VARIANTS[name]
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    decoder = FastDecoder(model, compile=options is not None)
    unfuse(model.llm, keep)
    decoder._prefill = _prefill_forward
    if options is not None:
        step = functools.partial(_decode_forward, block_sparse=block_sparse)
        decoder._single.step = decoder._batched.step = torch.compile(step, fullgraph=True, dynamic=False, options=options)
    start = time.perf_counter()
    with torch.inference_mode():
        decoder.generate(embeds, new_tokens)  # compiles / records the step, for the cache the timed runs use
        torch.cuda.synchronize()  # without eos the host does not wait for the tokens: time the GPU's work too
        ready_s = time.perf_counter() - start
        first = timed(lambda: decoder.generate(embeds, 1), 3)
        full = timed(lambda: decoder.generate(embeds, new_tokens), 3)
    out = decoder.generate(embeds, 64)
    print(
        json.dumps(
            {
                "variant": name,
                "batch": batch,
                "new_tokens": new_tokens,
                "tok_s": round(batch * (new_tokens - 1) / (full - first), 1),
                "step_ms": round((full - first) / (new_tokens - 1) * 1000, 3),
                "step_ready_s": round(ready_s, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "first_tokens": out[0, :8].tolist(),
            }
        ),
        flush=True,
    )

    loop = next(iter(decoder._slot(batch).loops.values()))
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
                "batch": batch,
                "kernel_us_per_step": round(sum(e.self_device_time_total for e in events) / 10, 1),
                "kernels_per_step": sum(e.count for e in events) / 10,
            }
        ),
        flush=True,
    )
    for event in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(
            json.dumps({"k": event.key[:90], "us_per_step": round(event.self_device_time_total / 10, 1), "n": event.count / 10}), flush=True
        )
    model.llm.fuse_projections()


if __name__ == "__main__":
    main()
