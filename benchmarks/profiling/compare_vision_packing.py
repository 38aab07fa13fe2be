"""The vision tower per image size against one packed pass over all sizes, in training (real size, one GPU).

Seed-shaped batches of 2 samples (the plugin's data path, as profile_train_step.py builds them; 2-4 image
sizes a batch) through the recipe's PEFT model in bf16. For each way of running the tower: forward+backward of
the vision part alone and of the whole model (no gradient checkpointing, eager decoder, then with the decoder
layers compiled), peak memory, kernel launches of a whole step; and how far the packed features are from the
per-size ones. Variants:

    per_size          one tower pass per image size (`model.vision_block = None`)
    packed            one pass over every patch, flash varlen attention (the default on a GPU in 16-bit)
    packed_compiled   the same with its block compiled (`torch.compile(packed_block, dynamic=True)`)

    python benchmarks/profiling/compare_vision_packing.py [--variants per_size packed] [--decoders eager compiled]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_train_step import cuda_time, lora_model, seed_batches, step_functions  # noqa: E402
from profiler_counts import kernel_launches  # noqa: E402

from axolotl_minicpmv.integration.compiled_layers import compile_decoder_layers  # noqa: E402
from axolotl_minicpmv.model.packed_vision import packed_block  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["per_size", "packed", "packed_compiled"])
    parser.add_argument("--decoders", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    args = parser.parse_args()
    batches = seed_batches(4)
    model = lora_model()
    inner = model.base_model.model
    blocks = {"per_size": None, "packed": packed_block, "packed_compiled": torch.compile(packed_block, dynamic=True)}
    variants = {name: blocks[name] for name in args.variants}
    result = {"gpu": torch.cuda.get_device_name(), "size_groups_per_batch": [len(b["pixel_values"]) for b in batches]}
    step, vision_only = step_functions(model, batches)

    with torch.no_grad():
        batch = next(b for b in batches if len(b["pixel_values"]) > 1)
        inner.vision_block = None
        reference = inner.get_image_features(batch["pixel_values"], batch["vision_order"]).float()
        inner.vision_block = packed_block
        packed = inner.get_image_features(batch["pixel_values"], batch["vision_order"]).float()
        result["packed_vs_per_size_max_abs"] = (packed - reference).abs().max().item()
        result["per_size_max_abs"] = reference.abs().max().item()
    print(json.dumps(result), flush=True)

    for decoder in args.decoders:
        if decoder == "compiled":
            compile_decoder_layers(model)
        for name, block in variants.items():
            inner.vision_block = block
            tag = f"{name}_{decoder}_decoder"
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            result[f"first_call_s_{tag}"] = round(time.perf_counter() - start, 1)
            torch.cuda.reset_peak_memory_stats()
            result[f"fwd_bwd_s_{tag}"] = round(cuda_time(step), 3)
            if decoder == "eager":
                result[f"vision_fwd_bwd_s_{name}"] = round(cuda_time(vision_only), 3)
            result[f"peak_gib_{tag}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            result[f"kernel_launches_{tag}"] = kernel_launches(prof.key_averages())
            model.zero_grad(set_to_none=True)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
