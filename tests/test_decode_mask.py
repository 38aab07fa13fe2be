"""The decoding step's block-sparse mask: the blocks it visits, attention through it, and FastDecoder's tokens
with rows whose padding and unwritten cache span whole blocks."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from axolotl_minicpmv.inference.decode_mask import BLOCK, decode_block_mask
from axolotl_minicpmv.inference.fast_decoding import FastDecoder


def _padding(length: int, pads: list[int]) -> torch.Tensor:
    padding = torch.ones((len(pads), length), dtype=torch.long)
    for row, pad in enumerate(pads):
        padding[row, :pad] = 0
    return padding


def _blocks(counts: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    return [indices[row, 0, 0, :count].tolist() for row, count in enumerate(counts[:, 0, 0].tolist())]


def test_only_blocks_with_visible_positions_are_visited():
    padding = _padding(4 * BLOCK, [0, 130, 2 * BLOCK + 5])
    mask = decode_block_mask(padding, torch.tensor(2 * BLOCK + 10))  # the query sits in block 2 of 4
    # Block 3 (unwritten) never; row 1's block 0 and row 2's blocks 0-1 are all padding. Blocks seen whole are
    # "full" (no mask_mod), the padding's edge and the query's block partial.
    assert _blocks(mask.full_kv_num_blocks, mask.full_kv_indices) == [[0, 1], [], []]
    assert _blocks(mask.kv_num_blocks, mask.kv_indices) == [[2], [1, 2], [2]]


ON_DEVICES = pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")),
    ],
)


@ON_DEVICES
def test_attention_through_the_mask_equals_the_dense_masked_one(device):
    # Compiled: flex's eager reference applies mask_mod everywhere and ignores the blocks; the fused kernel
    # (inductor's CPU one, or on a GPU its Triton decoding kernel) visits only the listed blocks and skips mask_mod
    # on full ones. Row 2 sees two partial blocks after a skipped one.
    torch.manual_seed(0)
    length, pads, position = 3 * BLOCK, [0, 7, BLOCK + 40], 2 * BLOCK + 3
    padding = _padding(length, pads).to(device)
    query = torch.randn(len(pads), 4, 1, 16, device=device)
    key, value = torch.randn(len(pads), 4, length, 16, device=device), torch.randn(len(pads), 4, length, 16, device=device)
    ours = torch.compile(flex_attention)(query, key, value, block_mask=decode_block_mask(padding, torch.tensor(position, device=device)))
    dense = (padding.bool() & (torch.arange(length, device=device) <= position))[:, None, None, :]
    theirs = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense)
    torch.testing.assert_close(ours, theirs)


@ON_DEVICES
@pytest.mark.parametrize("block_sparse", [True, False])
def test_rows_padded_over_whole_blocks_decode_generates_tokens(tiny_checkpoint_fp32, device, block_sparse):
    """Three rows of prompts 300, 160 and 20 positions long, left-padded to 300 (whole blocks of padding), in a
    512-position cache whose tail is unwritten: greedy tokens equal generate's, and each row's its own alone
    (float32; on a GPU the step is compiled, with block_sparse flex's fused kernel, and replayed from a CUDA graph).
    Dense beside block-sparse: on a GPU a difference in both points at the compiled padded prefill, not the mask."""
    from axolotl_minicpmv.model.modeling_minicpmv import MiniCPMV

    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval().to(device)
    torch.manual_seed(0)
    lengths = [300, 160, 20]
    embeds = torch.randn(len(lengths), 300, model.config.hidden_size).to(device) * 0.5  # the same prompt on every device
    mask = _padding(300, [300 - n for n in lengths]).to(device)
    embeds = embeds * mask[..., None]
    decoder = FastDecoder(model, block_sparse=block_sparse)
    assert decoder.block_sparse == block_sparse
    # generate's min_new_tokens keeps eos away for all 40 tokens: so does ours (without it a row could pick eos where
    # generate takes the runner-up, as a GPU-drawn prompt's row did at token 34, 2026-12-07)
    eos = {"eos_token_id": model.generation_config.eos_token_id, "min_new_tokens": 40}
    ours = decoder.generate(embeds, 40, attention_mask=mask, **eos)
    assert decoder._slot(3).key == (3, 512)
    with torch.inference_mode():
        theirs = model.generate(
            inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1, pad_token_id=0, max_new_tokens=40, min_new_tokens=40
        )
    first_differences = [next((i for i, (a, b) in enumerate(zip(o.tolist(), t.tolist())) if a != b), None) for o, t in zip(ours, theirs)]
    assert first_differences == [None] * len(lengths)
    alone = FastDecoder(model)  # its single-prompt cache: 512 positions from the first row on, mostly unwritten
    for row, n in enumerate(lengths):
        assert torch.equal(alone.generate(embeds[row : row + 1, 300 - n :], 40, **eos), ours[row : row + 1])
