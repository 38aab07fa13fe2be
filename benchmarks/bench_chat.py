"""Chat speed of MiniCPM-V 2.0 at the real size (random bf16 weights) on one GPU, through the public API.

Reports (median of --runs after warm-up): time to first token for a 448x448 and a 1344x896 image with
a one-sentence question, single-stream decode tokens/s over 256 forced tokens, total tokens/s for a
batch of 8 such requests, and peak GPU memory. Speed does not depend on the weights' values when the
token counts are fixed; the 256 new tokens are forced with min_new_tokens.

    python benchmarks/bench_chat.py [--fast] [--recorded] [--sizes WxH ...] [--batches 1 8] [--beams] [--out benchmarks/results.jsonl]

--fast measures `chat(..., fast=True)` and `FastDecoder` (static KV cache, CUDA graphs, no per-token
host synchronisation) and checks that its greedy tokens equal generate()'s. --recorded decodes through
`FastDecoder(compile=False)` (the eager step recorded as a CUDA graph: start-up in seconds); the time of the
first decode call, recording or compilation included, is `decode_first_call_s_batch*`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import record, versions  # noqa: E402

from axolotl_minicpmv import MiniCPMV, load_tokenizer  # noqa: E402
from axolotl_minicpmv.inference.fast_decoding import FastDecoder  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor, group_by_size, image_bounds  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import official_config  # noqa: E402
from axolotl_minicpmv.testing.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

QUESTION = "What is shown in this picture?"


def timed(fn, runs: int, warmup: int = 2, wait: bool = True) -> float:
    """Median seconds of `fn` from an idle GPU until its work is done (`wait`) or until it returns."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if wait:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(samples)


def bench_model(attn: str = "sdpa"):
    """(model, tokenizer, processor): real-size MiniCPM-V with seeded random bf16 weights on the GPU."""
    torch.manual_seed(0)
    config = official_config()
    config._attn_implementation = attn
    with torch.device("cuda"):
        model = MiniCPMV(config).to(torch.bfloat16).eval()
    tokenizer = load_tokenizer(write_tiny_tokenizer(tempfile.mkdtemp()))
    # The benchmark tokenizer is the tiny one (800 pieces; the real tokenizer cannot be downloaded here):
    # zero the lm_head rows past it so greedy answers stay decodable. Same matmul, same speed.
    with torch.no_grad():
        model.llm.lm_head.weight[len(tokenizer) :] = 0
    return model, tokenizer, MiniCPMVProcessor.from_config(tokenizer, config)


def picture(width: int, height: int) -> Image.Image:
    generator = torch.Generator().manual_seed(width * height)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def prompt_embeds(model, processor, image, batch: int):
    """Inputs of `batch` identical chat requests, built the way `chat` builds them."""
    msgs = [{"role": "user", "content": QUESTION}]
    ids = processor.encode_prompt(processor.chat_prompt(msgs, image)).unsqueeze(0).repeat(batch, 1).cuda()
    pixels, order = group_by_size(processor.pixel_values(image) * batch)
    bound = image_bounds(ids, processor.tokenizer.im_start_id, processor.tokenizer.im_end_id)
    with torch.inference_mode():
        return model.embed_inputs(ids, [p.cuda() for p in pixels], order, bound), ids.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--fast", action="store_true", help="chat(fast=True) / FastDecoder: static KV cache + CUDA graphs")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=["448x448", "1344x896"],
        help="images for time to first token, WxH; none (a bare --sizes) measures decoding only",
    )
    parser.add_argument("--ttft-only", action="store_true", help="skip the decode and memory measurements")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], choices=[1, 8], help="decode batch sizes")
    parser.add_argument("--beams", action="store_true", help="also beam search (3 beams, batch 1): FastDecoder's with --fast")
    parser.add_argument(
        "--recorded",
        action="store_true",
        help="decode (and beam search) through FastDecoder(compile=False): the eager step recorded as a CUDA graph, nothing compiled",
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.jsonl")))
    args = parser.parse_args()

    model, tokenizer, processor = bench_model(args.attn)
    result = {
        "bench": "chat",
        "gpu": torch.cuda.get_device_name(),
        "date": date.today().isoformat(),
        "fast": args.fast,
        "versions": versions("torch", "transformers", "timm"),
        "attn": args.attn,
        "command": "python " + " ".join(sys.argv),
    }

    msgs = [{"role": "user", "content": QUESTION}]
    for width, height in (tuple(int(v) for v in size.split("x")) for size in args.sizes):
        image = picture(width, height)
        start = time.perf_counter()  # the first call includes --fast's compilations (dynamic shapes: once)
        model.chat(image, msgs, tokenizer=tokenizer, sampling=False, num_beams=1, max_new_tokens=1, fast=args.fast)
        result[f"first_call_s_{width}x{height}"] = round(time.perf_counter() - start, 1)
        ttft = timed(
            lambda: model.chat(image, msgs, tokenizer=tokenizer, sampling=False, num_beams=1, max_new_tokens=1, fast=args.fast), args.runs
        )
        _, prompt_len = prompt_embeds(model, processor, image, 1)
        result[f"ttft_ms_{width}x{height}"] = round(ttft * 1000, 1)
        result[f"prompt_tokens_{width}x{height}"] = prompt_len
        result[f"vision_images_{width}x{height}"] = len(processor.vision_images(image))

    if args.ttft_only:
        record(result, Path(args.out))
        return
    decoder = FastDecoder(model, compile=not args.recorded)
    fast_decoding = args.fast or args.recorded
    result["decoder"] = "FastDecoder, eager step recorded" if args.recorded else "FastDecoder, compiled" if args.fast else "generate"

    def generate(embeds, new_tokens, fast=fast_decoding, **kwargs):
        if fast:
            return decoder.generate(embeds, new_tokens, **kwargs)
        with torch.inference_mode():
            return model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"),
                do_sample=False,
                num_beams=1,
                max_new_tokens=new_tokens,
                pad_token_id=0,
                **({"min_new_tokens": new_tokens} | kwargs),
            )

    image = picture(448, 448)
    for batch in args.batches:
        embeds, _ = prompt_embeds(model, processor, image, batch)
        torch.cuda.reset_peak_memory_stats()
        # The full request first: FastDecoder then sizes its cache (and compiles) once for both timings.
        start = time.perf_counter()
        generate(embeds, args.new_tokens)
        torch.cuda.synchronize()
        result[f"decode_first_call_s_batch{batch}"] = round(time.perf_counter() - start, 1)  # with compilation / recording
        full = timed(lambda: generate(embeds, args.new_tokens), args.runs)
        first = timed(lambda: generate(embeds, 1), args.runs)
        out = generate(embeds, args.new_tokens)
        assert out.shape == (batch, args.new_tokens), out.shape
        decode = full - first
        key = "decode_tokens_per_s_batch1" if batch == 1 else "total_tokens_per_s_batch8"
        result[key] = round(batch * (args.new_tokens - 1) / decode, 1)
        result[f"peak_mem_gib_batch{batch}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if fast_decoding and batch == 1:  # the fast decode path must emit the plain path's greedy tokens
            stop = {"eos_token_id": tokenizer.eos_token_id, "min_new_tokens": 64}
            fast, plain = generate(embeds, 64, **stop), generate(embeds, 64, fast=False, **stop)
            result["fast_equals_plain_64_tokens"] = bool(torch.equal(fast, plain))
            result["fast_vs_plain_first_diff"] = None if torch.equal(fast, plain) else int((fast != plain).nonzero()[0, 1])
        print("so far:", json.dumps(result), flush=True)  # each batch size's compilation takes minutes: a cut run keeps these
    if args.beams:  # the official default for sampling=False; tokens/s of the answer (one sequence), forced length
        embeds, _ = prompt_embeds(model, processor, image, 1)

        @torch.inference_mode()
        def beams(new_tokens):
            if fast_decoding:
                return decoder.beam_search(embeds, new_tokens, 3, repetition_penalty=1.2)
            return model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"),
                do_sample=False,
                num_beams=3,
                repetition_penalty=1.2,
                max_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )

        full = timed(lambda: beams(args.new_tokens), args.runs)
        first = timed(lambda: beams(1), args.runs)
        result["beam3_tokens_per_s"] = round((args.new_tokens - 1) / (full - first), 1)
    record(result, Path(args.out))


if __name__ == "__main__":
    main()
