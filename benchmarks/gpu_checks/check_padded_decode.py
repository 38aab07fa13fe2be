"""GPU check: where FastDecoder leaves generate() on left-padded rows (float32, the tiny checkpoint).

tests/test_decode_mask.py's padded batch (rows of prompts 300, 160 and 20 positions long, left-padded to 300,
a 512-position cache), with the prompt drawn twice: from the CPU generator (the test's) and from the GPU's (the
test's before 2026-12-07, whose run once left generate() at row 1, token 34). For each draw it prints:

- `fast`: FastDecoder's greedy tokens (recorded eager step; compiled dense step; compiled block-sparse step)
  against generate()'s, eos kept away from every step on both sides (generate's min_new_tokens): each row's first
  differing token, generate()'s top-2 logit margin there and both tokens (the GPU run of 2026-12-07 found the
  cause of the row-1 difference this way: FastDecoder was not given the eos that generate's min_new_tokens masks);
- `forced`: the pieces apart, fed generate()'s tokens (eager or compiled prefill; eager, compiled dense or
  compiled block-sparse step, no CUDA graph): each row's largest logit difference from generate()'s own logits.

A piece whose difference is near the margin where the tokens part is the cause; differences of ~1e-5 everywhere
point at the CUDA graph or the loop's bookkeeping.

    python benchmarks/gpu_checks/check_padded_decode.py [--draws cpu cuda]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))

from axolotl_minicpmv.inference.fast_decoding import (  # noqa: E402
    FastDecoder,
    _decode_forward,
    _prefill_forward,
    compiled_prefill,
    compiled_step,
)
from axolotl_minicpmv.model.modeling_minicpmv import MiniCPMV  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

LENGTHS, PROMPT, CACHE, NEW_TOKENS = [300, 160, 20], 300, 512, 40


def teacher_forced(model, prefill, step, embeds, mask, tokens) -> torch.Tensor:
    """(batch, NEW_TOKENS, vocab) logits of `prefill` then `step` fed generate()'s `tokens`, on a fresh cache."""
    padding = torch.ones((len(LENGTHS), CACHE), dtype=torch.long, device="cuda")
    padding[:, :PROMPT] = mask
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = StaticCache(config=model.config, max_cache_len=CACHE)
    logits = [prefill(model.llm, cache, embeds, position_ids, padding)]
    positions = mask.sum(-1, keepdim=True)
    for s in range(NEW_TOKENS - 1):
        index = torch.tensor(PROMPT + s, device="cuda")
        logits.append(step(model.llm, cache, tokens[:, s : s + 1], positions, padding, index))
        positions = positions + 1
    return torch.stack(logits, 1)


def first_differences(ours: torch.Tensor, theirs: torch.Tensor) -> list[int | None]:
    return [next((i for i, (a, b) in enumerate(zip(o.tolist(), t.tolist())) if a != b), None) for o, t in zip(ours, theirs)]


def compare(model, embeds, mask, source) -> None:
    plain = model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens, logits = plain.sequences, torch.stack(plain.logits, 1)
    top2 = logits.topk(2, -1).values
    margins = top2[..., 0] - top2[..., 1]
    decoders = {
        "recorded_eager": dict(compile=False),
        "compiled_dense": dict(block_sparse=False),
        "compiled_sparse": dict(block_sparse=True),
    }
    # generate's min_new_tokens keeps eos away from every step: FastDecoder is told the same
    eos = {"eos_token_id": model.generation_config.eos_token_id, "min_new_tokens": NEW_TOKENS}
    for name, options in decoders.items():
        ours = FastDecoder(model, **options).generate(embeds, NEW_TOKENS, attention_mask=mask, **eos)
        differences = first_differences(ours, tokens)
        at = [None if d is None else round(margins[r, d].item(), 6) for r, d in enumerate(differences)]
        there = [None if d is None else (ours[r, d].item(), tokens[r, d].item()) for r, d in enumerate(differences)]
        result = {"embeds_from": source, "fast": name, "first_difference": differences, "generate_top2_margin_there": at}
        print(json.dumps({**result, "tokens_there_ours_generates": there}), flush=True)
    eager_step = functools.partial(_decode_forward, block_sparse=False)
    pieces = {
        "eager_prefill+eager_step": (_prefill_forward, eager_step),
        "compiled_prefill+eager_step": (compiled_prefill(), eager_step),
        "eager_prefill+compiled_dense_step": (_prefill_forward, compiled_step(False)),
        "eager_prefill+compiled_sparse_step": (_prefill_forward, compiled_step(True)),
    }
    for name, (prefill, step) in pieces.items():
        forced = teacher_forced(model, prefill, step, embeds, mask, tokens)
        worst = (forced - logits).abs().amax(-1)  # (batch, step)
        print(
            json.dumps(
                {
                    "embeds_from": source,
                    "forced": name,
                    "max_logit_diff_per_row": worst.amax(1).tolist(),
                    "at_step": worst.argmax(1).tolist(),
                    "min_generate_top2_margin_per_row": margins.amin(1).tolist(),
                }
            ),
            flush=True,
        )


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"], help="the generators to draw prompts from")
    args = parser.parse_args()
    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", dtype=torch.float32)
    model = MiniCPMV.from_pretrained(checkpoint, dtype=torch.float32).eval().cuda()
    mask = torch.ones((len(LENGTHS), PROMPT), dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        mask[row, : PROMPT - length] = 0
    for source in args.draws:
        torch.manual_seed(0)
        embeds = torch.randn(len(LENGTHS), PROMPT, model.config.hidden_size, device=source).cuda() * 0.5 * mask[..., None].cuda()
        compare(model, embeds, mask.cuda(), source)


if __name__ == "__main__":
    main()
