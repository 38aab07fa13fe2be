"""GPU check: every fast or memory-saving training setting trains like the eager path, in bf16 at the real size.

The recipe's PEFT model (real config, random weights; LoRA on q|k|v, vision tower, resampler and embeddings
trained in full) takes three AdamW steps on three fixed seed-shaped batches (512-1024 tokens a row, 7-10
images of four sizes), once per setting on the same weights:

    reference   eager, float32      the yardstick of bf16 rounding
    eager       eager, bf16, the tower run once per image size: what each setting is compared with
    packed      the tower run once over all sizes' patches (flash varlen attention; the GPU default), bf16
    checkpoint  packed + gradient checkpointing (configs/minicpmv_lora_24gb.yml), bf16
    compiled    packed + decoder layers compiled in place (minicpmv_compile_layers), bf16
    amp         packed, the trained modules' weights float32 under bf16 autocast (a run without DeepSpeed:
                integration/precision.py); compared with float32

For each bf16 setting and step: the loss difference from bf16 eager and, for each trained part (vision tower,
resampler, embeddings, LoRA factors), the relative L2 difference of its gradients. Tolerance, stated in the
output: a setting passes when at every step each part's gradients stay within twice bf16 eager's own distance
from float32 at the first step (it changes them no more than bf16 rounding already does) and its loss within
1e-4 of bf16 eager's, relative. Only the first step compares float32 and bf16 on the same weights: the bf16 runs
train bf16 weights directly, whose AdamW updates (lr 1e-5) are mostly below bf16's resolution, so from the
second step on the float32 run is on another trajectory (2026-12-08: its gradients 0.9-2.2 apart from bf16's at
steps 2 and 3, against 0.012-0.028 at step 1), while the bf16 settings share bf16 eager's.

amp is judged at its first step, against float32: its gradients within twice bf16 eager's distance, its loss
within 1e-4. Later its float32 weights carry updates that its bf16 compute sees only where they cross a bf16
rounding step (as under DeepSpeed's float32 master weights), so its trajectory lies between float32's and bf16
eager's (2026-12-08: step-3 loss 11.397 against 11.245 and 11.515).

One JSON line. The decoder's random weights use a trained model's scale (TRAINED_DECODER_STD): with the config's
initializer_range, bf16 gradients at the real width were rounding noise (benchmarks/RESULTS.md, 2026-12-06).

    python benchmarks/gpu_checks/check_train_numerics.py [--settings packed checkpoint compiled amp]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))

from axolotl_minicpmv.integration.compiled_layers import compile_decoder_layers  # noqa: E402
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS  # noqa: E402
from axolotl_minicpmv.integration.precision import keep_trained_weights_float32  # noqa: E402
from axolotl_minicpmv.model.processing_minicpmv import move_inputs  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import OFFICIAL_CONFIG, TRAINED_DECODER_STD, official_config  # noqa: E402
from axolotl_minicpmv.testing.training_steps import recipe_lora_model, synthetic_batch, train_steps  # noqa: E402

# (tokens per row, image stacks (count, height, width)): a resized source picture plus slices, as the recipe's data
BATCHES = [
    (512, [(1, 378, 560), (6, 448, 448)]),
    (768, [(2, 448, 448), (1, 644, 308), (3, 336, 602)]),
    (1024, [(10, 448, 448)]),
]
LR = 1e-5
SETTINGS = ["packed", "checkpoint", "compiled", "amp"]


def prepare(model: torch.nn.Module, setting: str) -> None:
    if setting == "eager":
        model.base_model.model.vision_block = None  # one tower pass per image size
    elif setting == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif setting == "compiled":
        compile_decoder_layers(model)
    elif setting == "amp":
        keep_trained_weights_float32({"adapter": "lora", "bf16": True}, model)


def run(setting: str, dtype: torch.dtype, batches: list[dict]) -> tuple[list, float]:
    config = official_config(initializer_range=TRAINED_DECODER_STD)
    model = recipe_lora_model(config, DEFAULT_TARGETS, device="cuda", dtype=dtype, lora_r=64)
    prepare(model, setting)
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=setting == "amp"):
        steps = train_steps(model, batches, lr=LR)
    torch.cuda.synchronize()
    del model
    torch.cuda.empty_cache()
    return steps, time.perf_counter() - start


PARTS = {"vision": ".vpm.", "resampler": ".resampler.", "embeddings": ".embed_tokens.", "lora": ".lora_"}


def distance(steps, reference) -> list[dict]:
    """Per step: the loss difference and, per trained part, the relative L2 difference of its gradients taken
    as one vector (|g - g_ref| / |g_ref|; single tensors with near-zero gradients would swamp a per-tensor maximum)."""
    out = []
    for (loss, grads), (ref_loss, ref_grads) in zip(steps, reference, strict=True):
        if grads.keys() != ref_grads.keys():
            raise AssertionError(f"different trained tensors: {sorted(grads.keys() ^ ref_grads.keys())[:5]}")
        rel = {}
        for part, marker in PARTS.items():
            names = [name for name in ref_grads if marker in name]
            diff = sum((grads[n] - ref_grads[n]).square().sum() for n in names)
            norm = sum(ref_grads[n].square().sum() for n in names)
            rel[part] = (diff.sqrt() / norm.sqrt().clamp_min(1e-30)).item()
        out.append({"loss": loss, "loss_diff": abs(loss - ref_loss), "grad_rel": rel})
    return out


LOSS_RTOL = 1e-4  # a fortieth of one bf16 rounding step of the loss value itself (2^-8 relative)


def within(diffs, rounding) -> bool:
    """Every step: each part's gradients within twice bf16 eager's own distance from float32 at step 1 (the one
    step where both hold the same weights), and the loss within LOSS_RTOL of bf16 eager's."""
    first = rounding[0]["grad_rel"]
    return all(
        d["loss_diff"] <= LOSS_RTOL * abs(d["loss"]) and all(d["grad_rel"][part] <= 2 * first[part] for part in PARTS) for d in diffs
    )


def matches_float32_at_step_1(diffs, rounding) -> bool:
    """amp's first step (the one on float32's weights): each part's gradients within twice bf16 eager's distance from
    float32, and the loss within LOSS_RTOL of float32's, relative."""
    d, r = diffs[0], rounding[0]
    return d["loss_diff"] <= LOSS_RTOL * abs(d["loss"]) and all(d["grad_rel"][part] <= 2 * r["grad_rel"][part] for part in PARTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 yardstick in true float32
    vocab, queries = OFFICIAL_CONFIG["vocab_size"], OFFICIAL_CONFIG["query_num"]
    host_batches = [synthetic_batch(length, sizes, vocab, queries, seed) for seed, (length, sizes) in enumerate(BATCHES)]
    batches = {dtype: [move_inputs(b, "cuda") for b in host_batches] for dtype in (torch.float32, torch.bfloat16)}
    for batch in batches[torch.bfloat16]:
        batch["pixel_values"] = [p.bfloat16() for p in batch["pixel_values"]]

    reference, _ = run("eager", torch.float32, batches[torch.float32])
    eager, eager_s = run("eager", torch.bfloat16, batches[torch.bfloat16])
    bf16_rounding = distance(eager, reference)
    if "amp" in args.settings:  # compared with float32, so before its gradients are freed
        amp_steps, amp_s = run("amp", torch.bfloat16, batches[torch.bfloat16])
        amp = {"vs_float32": distance(amp_steps, reference), "seconds_incl_compilation": round(amp_s, 1)}
        amp["passed"] = matches_float32_at_step_1(amp["vs_float32"], bf16_rounding)
        del amp_steps  # frees its gradients
    reference = None  # frees the float32 gradients
    result = {
        "check": "train_numerics",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "lr": LR,
        "batches": BATCHES,
        "tolerance": "each step: each part's relative gradient difference from bf16 eager <= 2x bf16 eager's own from float32 at "
        f"step 1; loss within {LOSS_RTOL} of bf16 eager's, relative; amp, at step 1 against float32: gradients <= 2x bf16 eager's "
        "distance, loss within LOSS_RTOL",
        "eager_bf16_vs_float32": bf16_rounding,
        "eager_bf16_seconds": round(eager_s, 1),
        "settings": {},
    }
    for setting in args.settings:
        if setting == "amp":
            result["settings"]["amp"] = amp
            continue
        steps, seconds = run(setting, torch.bfloat16, batches[torch.bfloat16])
        diffs = distance(steps, eager)
        result["settings"][setting] = {
            "vs_eager_bf16": diffs,
            "passed": within(diffs, bf16_rounding),
            "seconds_incl_compilation": round(seconds, 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
