"""GPU check: FastDecoder on left-padded rows, dense and block-sparse, against generate() and the eager step.

tests/test_decode_mask.py's padded batch on the GPU in float32 (the tiny checkpoint; rows of prompts 300, 160
and 20 positions long, left-padded to 300, a 512-position cache): for each decoding step (dense SDPA mask, and
block-sparse) the first token where each row leaves generate()'s greedy tokens, then the compiled step
teacher-forced along generate()'s tokens beside the eager dense step on caches prefilled alike. A logit
difference far below the smallest top-2 margin with differing tokens points at the compiled prefill; a large
difference in the block-sparse step only, at the mask or flex attention's kernel. One JSON line per step kind.

    python benchmarks/gpu_checks/check_padded_decode.py
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))

from axolotl_minicpmv.inference.fast_decoding import (  # noqa: E402
    STEP_COMPILE_OPTIONS,
    FastDecoder,
    _decode_forward,
    _prefill_forward,
)
from axolotl_minicpmv.model.modeling_minicpmv import MiniCPMV  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

LENGTHS, PROMPT, CACHE, NEW_TOKENS = [300, 160, 20], 300, 512, 40


def first_differences(ours: torch.Tensor, theirs: torch.Tensor) -> list[int | None]:
    return [next((i for i, (a, b) in enumerate(zip(o.tolist(), t.tolist())) if a != b), None) for o, t in zip(ours, theirs)]


def teacher_forced(model, step, embeds, mask, tokens) -> dict:
    """The compiled `step` and the eager dense step fed generate()'s tokens, each on its own prefilled cache."""
    padding = torch.ones((len(LENGTHS), CACHE), dtype=torch.long, device="cuda")
    padding[:, :PROMPT] = mask
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    caches = [StaticCache(config=model.config, max_cache_len=CACHE) for _ in range(2)]
    for cache in caches:
        _prefill_forward(model.llm, cache, embeds, position_ids, padding)
    positions = mask.sum(-1, keepdim=True)
    worst, margin = torch.zeros(len(LENGTHS)), torch.full((len(LENGTHS),), float("inf"))
    for s in range(NEW_TOKENS - 1):
        token, index = tokens[:, s : s + 1], torch.tensor(PROMPT + s, device="cuda")
        eager = _decode_forward(model.llm, caches[0], token, positions, padding, index, block_sparse=False)
        compiled = step(model.llm, caches[1], token, positions, padding, index)
        worst = torch.maximum(worst, (eager - compiled).abs().amax(-1).cpu())
        top2 = eager.topk(2, -1).values
        margin = torch.minimum(margin, (top2[:, 0] - top2[:, 1]).cpu())
        positions = positions + 1
    return {"max_abs_logit_diff_per_row": worst.tolist(), "min_top2_margin_per_row": margin.tolist()}


@torch.inference_mode()
def main() -> None:
    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", dtype=torch.float32)
    model = MiniCPMV.from_pretrained(checkpoint, dtype=torch.float32).eval().cuda()
    torch.manual_seed(0)
    mask = torch.ones((len(LENGTHS), PROMPT), dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        mask[row, : PROMPT - length] = 0
    embeds = (torch.randn(len(LENGTHS), PROMPT, model.config.hidden_size) * 0.5 * mask[..., None]).cuda()
    mask = mask.cuda()
    plain = model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    for block_sparse in (False, True):
        fast = FastDecoder(model, block_sparse=block_sparse).generate(embeds, NEW_TOKENS, attention_mask=mask)
        step = torch.compile(
            functools.partial(_decode_forward, block_sparse=block_sparse), fullgraph=True, dynamic=False, options=STEP_COMPILE_OPTIONS
        )
        row = {"block_sparse": block_sparse, "first_difference_per_row": first_differences(fast, plain)}
        row.update(teacher_forced(model, step, embeds, mask, plain))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
