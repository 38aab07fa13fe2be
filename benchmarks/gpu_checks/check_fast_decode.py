"""GPU check: FastDecoder (compiled decoder step in a CUDA graph) emits generate()'s greedy tokens.

Real config, random weights at a trained model's scale (TRAINED_DECODER_STD: at the config's initializer_range the
random decoder is chaotic, and bf16 rounding alone turns its tokens), in float32 and bfloat16, each part printed as
a JSON line as it ends:
- 64 greedy tokens of a fixed 448x448 image prompt, FastDecoder against `generate`;
- a fixed set of prompts (PROMPT_SET: four picture sizes, three questions) answered alone by `generate` and by
  FastDecoder, compiled and recorded (chat()'s default), with `generate` through eager attention as the control
  (two plain paths: how far bf16 rounding alone takes them apart): the prompts whose first 64 tokens agree, and
  where a path parts, the plain path's top-2 logit margin there beside bf16's spacing at that logit (a margin of a
  few spacings is a tie that rounding decides);
- streamed decoding (`on_tokens`, as the server decodes) against unstreamed, and FastDecoder's beam search
  against generate's;
- the compiled step teacher-forced along generate()'s tokens next to the eager step, each on its own static
  cache: the largest logit difference and the smallest top-2 margins;
- a left-padded batch of mixed prompts (pictures of three sizes, a text-only row, two pictures in one row, as
  `predict` batches them) through `generate_answers` fast and plain: the rows whose tokens agree.

    python benchmarks/gpu_checks/check_fast_decode.py [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from transformers.cache_utils import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat

from bench_chat import picture, prompt_embeds  # noqa: E402

from axolotl_minicpmv import MiniCPMV, load_tokenizer  # noqa: E402
from axolotl_minicpmv.inference.fast_decoding import FastDecoder, _decode_forward  # noqa: E402
from axolotl_minicpmv.inference.generate import generate_answers  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import TRAINED_DECODER_STD, official_config  # noqa: E402
from axolotl_minicpmv.testing.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

NEW_TOKENS = 64
PROMPT_SET = [
    (size, question)
    for size in ((448, 448), (896, 448), (1344, 896), (672, 1008))
    for question in ("What is in the picture?", "Describe the colours, then count the shapes.", "Is it day or night?")
]


def teacher_forced(model, decoder, embeds, tokens) -> dict:
    """Eager and compiled decoder steps fed the same tokens, each on its own static cache."""
    caches = []
    for _ in range(2):
        cache = StaticCache(config=model.config, max_cache_len=256)
        model.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
        caches.append(cache)
    padding = torch.ones((1, 256), dtype=torch.long, device=embeds.device)
    diffs, margins, agree = [], [], 0
    for step in range(tokens.shape[1] - 1):
        token = tokens[:, step : step + 1]
        position = torch.full_like(token, embeds.shape[1] + step)
        index = torch.tensor(embeds.shape[1] + step, device=embeds.device)
        eager = _decode_forward(model.llm, caches[0], token, position, padding, index, block_sparse=False)[0]
        compiled = decoder._single.step(model.llm, caches[1], token, position, padding, index)[0].clone()
        top2 = eager.topk(2).values
        diffs.append(float((eager - compiled).abs().max()))
        margins.append(float(top2[0] - top2[1]))
        agree += bool(eager.argmax() == compiled.argmax())
    close_calls = [round(m, 5) for m, d in zip(margins, diffs) if m <= 2 * d]
    return {
        "teacher_forced_steps": len(diffs),
        "argmax_agree": agree,
        "max_abs_logit_diff": max(diffs),
        "steps_with_margin_below_2x_diff": len(close_calls),
        "those_margins": close_calls[:10],
    }


def streamed(decoder, embeds, stop) -> dict:
    """Streaming (`on_tokens`, the host reading step t while step t + 1 runs): the same tokens, handed over
    in order; a row ended at step 10 holds pad after it. The unstreamed tokens are decoded again here, on the
    cache the streamed runs get: the prompt set before may have grown the decoder's cache, and in bf16 a longer
    cache is another rounding of the same attention."""
    unstreamed = decoder.generate(embeds, NEW_TOKENS, **stop)
    seen, calls = [], []

    def watch(tokens):
        seen.append(tokens[0])
        return []

    def end_at_step_10(tokens):
        calls.append(tokens[0])
        return [0] if len(calls) == 11 else []

    whole = decoder.generate(embeds, NEW_TOKENS, on_tokens=watch, **stop)
    cut = decoder.generate(embeds, NEW_TOKENS, on_tokens=end_at_step_10, **stop)
    expected_cut = unstreamed[0, :11].tolist() + [0] * (NEW_TOKENS - 11)
    return {
        "streamed_equals_unstreamed": bool(torch.equal(whole, unstreamed)) and seen == unstreamed[0].tolist(),
        "streamed_cut_at_step_10_ok": cut[0].tolist() == expected_cut,
    }


def beams(model, decoder, embeds, eos_token_id) -> dict:
    """FastDecoder's beam search (chat's default: 3 beams, repetition penalty 1.2) against generate's."""
    settings = {"eos_token_id": eos_token_id, "min_new_tokens": NEW_TOKENS, "repetition_penalty": 1.2}
    fast = decoder.beam_search(embeds, NEW_TOKENS, 3, **settings)
    plain = model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
        do_sample=False,
        num_beams=3,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        **settings,
    )
    same = fast.shape == plain.shape and bool(torch.equal(fast, plain))
    first = next((i for i, (a, b) in enumerate(zip(fast[0].tolist(), plain[0].tolist())) if a != b), None)
    return {"beams_equal_generate": same, "beams_first_diff": None if same else first}


def padded_batch(model, processor) -> dict:
    """`generate_answers` fast (FastDecoder, left padding in its static mask) and plain on one mixed batch.

    `generate_answers` decodes its answers to text with the tiny tokenizer (800 pieces), so this part, run last,
    zeroes the lm_head rows past it first (as bench_chat.py does): the other parts compare the full vocabulary."""
    with torch.no_grad():
        model.llm.lm_head.weight[len(processor.tokenizer) :] = 0
    rows = [
        ([{"role": "user", "content": "What is in the picture?"}], [picture(448, 448)]),
        ([{"role": "user", "content": "Describe it: <image>"}], [picture(1344, 896)]),
        ([{"role": "user", "content": "What is 17 times 3?"}], []),
        ([{"role": "user", "content": "<image> or <image>: which is brighter?"}], [picture(896, 896), picture(448, 672)]),
    ]
    conversations, pictures = [c for c, _ in rows], [p for _, p in rows]
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "num_beams": 1}
    fast = generate_answers(model, processor, conversations, pictures, fast=True, **kwargs)
    plain = generate_answers(model, processor, conversations, pictures, fast=False, **kwargs)
    return {
        "padded_batch_rows": len(rows),
        "padded_batch_rows_equal": sum(f.token_ids == p.token_ids for f, p in zip(fast, plain)),
        "padded_batch_first_diffs": [
            next((i for i, (a, b) in enumerate(zip(f.token_ids, p.token_ids)) if a != b), None) for f, p in zip(fast, plain)
        ],
    }


def plain_generate(model, embeds, attention_mask, stop, **kwargs):
    return model.generate(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        **stop,
        **kwargs,
    )


def eager_attention_generate(model, embeds, attention_mask, stop):
    """`generate` with the attention written out (matmul, softmax, matmul) instead of SDPA's kernel: a second plain
    path, whose agreement with the first is what bf16 rounding alone leaves (the control of the prompt set)."""
    shipped = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return plain_generate(model, embeds, attention_mask, stop)
    finally:
        model.set_attn_implementation(shipped)


def prompt_set(model, processor, decoders: dict, stop) -> dict:
    """PROMPT_SET answered alone by `generate` and by each FastDecoder (compiled, and recorded eager: chat()'s
    default), and, as the control, by `generate` with eager attention: how many agree on all NEW_TOKENS tokens, and
    where one parts, the plain path's top-2 margin there against the logit's bf16 spacing (2**(exponent - 7))."""
    answerers = {
        name: lambda embeds, mask, decoder=decoder: decoder.generate(embeds, NEW_TOKENS, **stop) for name, decoder in decoders.items()
    }
    answerers["plain_eager_attention"] = lambda embeds, mask: eager_attention_generate(model, embeds, mask, stop)
    agree, partings = dict.fromkeys(answerers, 0), {name: [] for name in answerers}
    for (width, height), question in PROMPT_SET:
        batch = processor([[{"role": "user", "content": question}]], [[picture(width, height)]], device=model.device)
        keys = ("input_ids", "pixel_values", "vision_order", "image_bound")
        embeds = model.embed_inputs(*(batch.get(k) for k in keys))
        plain = plain_generate(model, embeds, batch["attention_mask"], stop, output_scores=True, return_dict_in_generate=True)
        for name, answer in answerers.items():
            fast = answer(embeds, batch["attention_mask"])
            if torch.equal(fast, plain.sequences):
                agree[name] += 1
                continue
            step = int((fast != plain.sequences).nonzero()[0, 1])
            top2 = plain.scores[step][0].float().topk(2).values
            spacing = 2.0 ** (torch.frexp(top2[0]).exponent.item() - 1 - 7)
            partings[name].append(
                {
                    "prompt": f"{width}x{height} {question[:20]}",
                    "token": step,
                    "margin": round(float(top2[0] - top2[1]), 5),
                    "bf16_spacing": spacing,
                }
            )
    return {
        "prompt_set": len(PROMPT_SET),
        "plain_attention": model.config._attn_implementation,  # the control's other side is "eager"
        "prompt_set_agree_64": agree,
        "prompt_set_partings": partings,
    }


def check(name: str, tokenizer, stop: dict) -> None:
    """Every comparison for one dtype, each part printed as it ends, the prompt set (the bf16 goal's measure)
    first: a run cut by a time limit still reports what it reached."""
    dtype = getattr(torch, name)
    torch.manual_seed(0)
    config = official_config(initializer_range=TRAINED_DECODER_STD)
    with torch.device("cuda"):
        model = MiniCPMV(config).to(dtype).eval()
    processor = MiniCPMVProcessor.from_config(tokenizer, config)
    embeds, _ = prompt_embeds(model, processor, picture(448, 448), 1)
    with torch.inference_mode():
        plain = plain_generate(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"), stop)
        decoder = FastDecoder(model)
        fast = decoder.generate(embeds, NEW_TOKENS, **stop)
        same = bool(torch.equal(fast, plain))
        print(
            json.dumps({"dtype": name, "fast_equals_generate": same, "first_diff": None if same else int((fast != plain).nonzero()[0, 1])})
        )
        for part in (
            lambda: prompt_set(model, processor, {"compiled": decoder, "recorded": FastDecoder(model, compile=False)}, stop),
            lambda: streamed(decoder, embeds, stop),
            lambda: beams(model, decoder, embeds, stop["eos_token_id"]),
            lambda: teacher_forced(model, decoder, embeds, plain),
            lambda: padded_batch(model, processor),
        ):
            try:
                print(json.dumps({"dtype": name, **part()}), flush=True)
            except Exception as err:  # one failing part must not cost the others' (or the next dtype's) GPU time
                print(json.dumps({"dtype": name, "part_failed": f"{type(err).__name__}: {err}"}), flush=True)
                traceback.print_exc()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    tokenizer = load_tokenizer(write_tiny_tokenizer(tempfile.mkdtemp()))
    stop = {"eos_token_id": tokenizer.eos_token_id, "min_new_tokens": NEW_TOKENS}
    for name in args.dtypes:
        check(name, tokenizer, stop)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
