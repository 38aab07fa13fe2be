"""The fast chat path's pieces on one GPU (real size, random bf16 weights).

For the vision encoder with compiled blocks (4 image sizes) and the compiled prefill (3 prompt lengths):
the first call's time (compilation), new compiled graphs, eager vs fast median ms and the largest
difference from the eager result; then chat() time to first token, plain and fast (7 runs each, same
process, so the same host). One JSON line per measurement.

    python benchmarks/profile_fast_path.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers.cache_utils import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_chat import QUESTION, bench_model, picture, timed  # noqa: E402

from axolotl_minicpmv.processing_minicpmv import group_by_size, image_bounds, to_pixel_values  # noqa: E402

MSGS = [{"role": "user", "content": QUESTION}]


def first_call(fn):
    """(result, seconds, new compiled graphs) of one synchronised call."""
    graphs = counters["stats"]["unique_graphs"]
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, round(time.perf_counter() - start, 2), counters["stats"]["unique_graphs"] - graphs


def ms(fn, runs: int = 5) -> float:
    return round(timed(fn, runs) * 1000, 2)


def main() -> None:
    model, tokenizer, processor = bench_model()
    with torch.inference_mode():
        model._init_fast_path()
        encode, decoder = model._fast_encode_images, model._fast_decoder
        for size in [(1344, 896), (448, 448), (1000, 700), (800, 1200)]:
            groups, _ = group_by_size([to_pixel_values(i, "cuda") for i in processor.vision_images(picture(*size))])
            fast, seconds, graphs = first_call(lambda: torch.cat([encode(g) for g in groups]))
            eager = torch.cat([model.encode_images(g) for g in groups])
            print(json.dumps({"vision": size, "first_call_s": seconds, "new_graphs": graphs,
                              "eager_ms": ms(lambda: [model.encode_images(g) for g in groups]), "fast_ms": ms(lambda: [encode(g) for g in groups]),
                              "max_abs": float((fast - eager).abs().max()), "ref_max": float(eager.abs().max())}), flush=True)

        cache = StaticCache(config=model.config, max_cache_len=1024)
        for size in [(1344, 896), (448, 448), (1000, 700)]:
            image = picture(*size)
            ids = processor.encode_prompt(processor.chat_prompt(MSGS, image)).unsqueeze(0).cuda()
            groups, order = group_by_size([to_pixel_values(i, "cuda") for i in processor.vision_images(image)])
            embeds = model.embed_inputs(ids, groups, order, image_bounds(ids, tokenizer.im_start_id, tokenizer.im_end_id))

            def prefill():
                cache.reset()
                torch._dynamo.mark_dynamic(embeds, 1)  # as FastDecoder.generate does
                return decoder._prefill(model.llm, cache, embeds)

            def eager_prefill():
                return model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

            fast, seconds, graphs = first_call(prefill)
            eager = eager_prefill().logits[:, -1]
            print(json.dumps({"prefill": size, "tokens": embeds.shape[1], "first_call_s": seconds, "new_graphs": graphs,
                              "eager_ms": ms(eager_prefill), "fast_ms": ms(prefill), "max_abs": float((fast - eager).abs().max()),
                              "argmax_equal": bool(fast.argmax() == eager.argmax())}), flush=True)

        for size in [(1344, 896), (448, 448)]:
            image = picture(*size)
            for fast in (False, True):
                seconds = timed(lambda: model.chat(image, MSGS, tokenizer=tokenizer, sampling=False, num_beams=1, max_new_tokens=1, fast=fast), 7)
                print(json.dumps({"chat_ttft": size, "fast": fast, "ms": round(seconds * 1000, 1)}), flush=True)


if __name__ == "__main__":
    main()
