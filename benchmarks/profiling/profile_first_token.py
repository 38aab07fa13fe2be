"""Where the first token's time goes for a 1344x896 image (real size, random bf16 weights, one GPU).

Times the CPU stages (slicing and its bicubic resizes, pixels, prompt ids), then the vision tower +
resampler eager, with compiled blocks, and with compiled blocks replayed from CUDA graphs (what
`chat(fast=True)` runs), and the decoder prefill eager, compiled, and compiled replayed from a CUDA graph (what a
lone `chat(fast=True)` prompt runs from its length's second request on): wall time (synchronised), host time
until the call returns (dispatch), and how far each result is from the eager one. When dispatch is close
to the wall time and the kernel time (the footer of each stage's torch.profiler table) is well below it,
the stage is bound by the host CPU launching kernels. Then `chat()` and `chat(fast=True)` time to first
token in this one process (so on one host), and where `chat(fast=True)` makes the host wait for the GPU.

    python benchmarks/profiling/profile_first_token.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers.cache_utils import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profiler_counts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat

from bench_chat import QUESTION, bench_model, picture, timed  # noqa: E402
from profiler_counts import kernel_launches, sync_points  # noqa: E402

from axolotl_minicpmv.inference.fast_decoding import _PrefillGraphs  # noqa: E402
from axolotl_minicpmv.inference.fast_vision import image_encoder  # noqa: E402
from axolotl_minicpmv.model.image_processing_minicpmv import MiniCPMVImageProcessor, group_by_size  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import image_bounds  # noqa: E402

to_pixel_values = MiniCPMVImageProcessor().to_pixel_values
from axolotl_minicpmv.model.slicing import slice_sizes  # noqa: E402


def ms(fn, runs: int = 7) -> float:
    return round(timed(fn, runs) * 1000, 2)


def dispatch_ms(fn, runs: int = 5) -> float:
    """Median host time until `fn` returns, the GPU idle at the start of each call."""
    return round(timed(fn, runs, warmup=1, wait=False) * 1000, 2)


def profile(name: str, fn) -> None:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"== {name}: {kernel_launches(events)} kernel launches", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60), flush=True)


def main() -> None:
    model, tokenizer, processor = bench_model()
    image = picture(1344, 896)
    msgs = [{"role": "user", "content": QUESTION}]
    source, cell, grid = slice_sizes(image.size)
    images = processor.vision_images(image)
    print(
        json.dumps(
            {
                "source": source,
                "cell": cell,
                "grid": grid,
                "vision_images": len(images),
                "slice_sizes_ms": ms(lambda: slice_sizes(image.size)),
                "source_resize_ms": ms(lambda: image.resize(source, Image.Resampling.BICUBIC)),
                "cells_ms": ms(lambda: processor.cell_images(image)),
                "to_pixels_cpu_ms": ms(lambda: [to_pixel_values(i) for i in images]),
                "to_pixels_gpu_ms": ms(lambda: [to_pixel_values(i, "cuda") for i in images]),
                "prompt_ms": ms(lambda: processor.encode_prompt(processor.chat_prompt(msgs, image))),
            }
        ),
        flush=True,
    )

    ids = processor.encode_prompt(processor.chat_prompt(msgs, image)).unsqueeze(0).cuda()
    groups, order = group_by_size([to_pixel_values(i, "cuda") for i in images])
    bound = image_bounds(ids, tokenizer.im_start_id, tokenizer.im_end_id)

    def first_token(fast):
        return lambda: model.chat(image, msgs, tokenizer=tokenizer, sampling=False, num_beams=1, max_new_tokens=1, fast=fast)

    with torch.inference_mode():
        embeds = model.embed_inputs(ids, groups, order, bound)
        first_token(True)()  # compiles the fast path
        compiled_blocks = image_encoder(model, compile_blocks=True)
        eager_features = [model.encode_images(g) for g in groups]
        compiled_features = [compiled_blocks(g) for g in groups]
        graphed_features = [model._fast_encode_images(g) for g in groups]
        cache = StaticCache(config=model.config, max_cache_len=512)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        padding = torch.ones((1, 512), dtype=torch.long, device=embeds.device)
        eager_logits = model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits[:, -1]
        cache.reset()
        compiled_logits = model._fast_decoder._prefill(model.llm, cache, embeds, positions, padding)
        graphed_prefill = _PrefillGraphs(model._fast_decoder._prefill, cache)  # what a lone chat() prompt replays
        for _ in range(2):  # the second call records; each starts from an empty cache, as FastDecoder's do
            cache.reset()
            graphed_logits = graphed_prefill(model.llm, cache, embeds, positions, padding).clone()
        print(
            json.dumps(
                {
                    "vision_compiled_max_abs_diff": max(float((c - e).abs().max()) for c, e in zip(compiled_features, eager_features)),
                    "vision_eager_max_abs": max(float(e.abs().max()) for e in eager_features),
                    "vision_graphed_equals_compiled": all(torch.equal(g, c) for g, c in zip(graphed_features, compiled_features)),
                    "prefill_compiled_max_abs_logit_diff": float((compiled_logits - eager_logits).abs().max()),
                    "prefill_argmax_equal": bool(torch.equal(compiled_logits.argmax(-1), eager_logits.argmax(-1))),
                    "prefill_graphed_equals_compiled": bool(torch.equal(graphed_logits, compiled_logits)),
                }
            ),
            flush=True,
        )
        stages = {
            "vision_eager": lambda: model.get_image_features(groups, order),
            "vision_compiled": lambda: [compiled_blocks(g) for g in groups],
            "vision_graphed": lambda: [model._fast_encode_images(g) for g in groups],
            "prefill_eager": lambda: model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1),
            "prefill_compiled": lambda: (cache.reset(), model._fast_decoder._prefill(model.llm, cache, embeds, positions, padding)),
            "prefill_graphed": lambda: (cache.reset(), graphed_prefill(model.llm, cache, embeds, positions, padding)),
        }
        row = {}
        for name, fn in stages.items():
            row[f"{name}_ms"], row[f"{name}_dispatch_ms"] = ms(fn), dispatch_ms(fn)
        row["chat_ttft_ms"], row["chat_fast_ttft_ms"] = ms(first_token(False)), ms(first_token(True))
        row["chat_fast_sync_points"] = sync_points(first_token(True))
        print(json.dumps(row), flush=True)
        for name, fn in stages.items():
            profile(name, fn)


if __name__ == "__main__":
    main()
