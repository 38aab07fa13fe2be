"""The recipe's LoRA model on random weights and fixed synthetic batches, for comparing training settings.

The CPU tests (float32, tiny sizes) and the GPU check (`benchmarks/gpu_checks/check_train_numerics.py`,
bf16, real sizes) build the same PEFT model the Axolotl recipe trains (LoRA on q|k|v, the vision tower,
resampler and embeddings fully trained) and run the same steps through it, so a fast setting is compared
with the eager path on identical weights and data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model

from ..model.configuration_minicpmv import MiniCPMVConfig
from ..model.modeling_minicpmv import MiniCPMV

FULLY_TRAINED = ["vpm", "resampler", "embed_tokens"]


def recipe_lora_model(
    config: MiniCPMVConfig, target_modules: str, seed: int = 0, device="cpu", dtype=torch.float32, lora_r: int = 8
) -> torch.nn.Module:
    """A seeded random MiniCPM-V wrapped as the recipe trains it, LoRA on `target_modules` (the integration layer's
    DEFAULT_TARGETS for the recipe; LoRA B non-zero, so every LoRA factor gets a gradient)."""
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = MiniCPMV(config).to(dtype)
    lora = LoraConfig(r=lora_r, target_modules=target_modules, modules_to_save=FULLY_TRAINED, init_lora_weights=False)
    return get_peft_model(model, lora).train()


def synthetic_batch(length: int, image_sizes: Sequence[tuple[int, int, int]], vocab_size: int, query_num: int, seed: int) -> dict:
    """Two rows of `length` random tokens, all supervised, with images given as (count, height, width) stacks.

    The images' `query_num`-token slots alternate between the rows (two tokens apart), as the collator
    would place them; `pixel_values` is one same-size stack per entry of `image_sizes`.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (2, length), generator=generator)
    count = sum(n for n, _, _ in image_sizes)
    stride = query_num + 2
    bounds = [[i % 2, 2 + stride * (i // 2), 2 + stride * (i // 2) + query_num] for i in range(count)]
    if bounds and bounds[-1][2] > length:
        raise ValueError(f"{count} images need {bounds[-1][2]} tokens, more than the length {length}")
    for row, start, end in bounds:
        ids[row, start:end] = 0
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids.clone(),
        pixel_values=[torch.randn(n, 3, h, w, generator=generator) for n, h, w in image_sizes],
        vision_order=torch.arange(count),
        image_bound=torch.tensor(bounds).reshape(-1, 3),
    )


def train_steps(model: torch.nn.Module, batches: Sequence[dict], lr: float = 1e-4) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """One AdamW step per batch; returns each step's loss and the gradients of every trained tensor (float32 copies)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, foreach=False)
    results = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
        optimizer.step()
    return results
