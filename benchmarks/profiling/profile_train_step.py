"""Where a training step of the seed's recipe spends its time (real size, random bf16 weights, one GPU).

Builds batches of 2 seed-shaped samples with the plugin's own data path (prepare -> prompt strategy ->
collator), wraps the model like the Axolotl run (LoRA r 64 on q|k|v, vision tower / resampler /
embeddings trained in full) and times forward+backward with and without gradient checkpointing, plus
the vision part alone, with a profiler table of each step. `--compile` repeats the timings with the
decoder layers compiled in place (`minicpmv_compile_layers`); `--deepspeed CONFIG`
then drives a real DeepSpeed engine on a fresh eager model (no gradient checkpointing, fused AdamW)
and times its forward, backward and optimizer step apart, and whole steps without synchronisation, and
lists where such a step makes the host wait for the GPU.

    python benchmarks/profiling/profile_train_step.py --compile --deepspeed configs/deepspeed/zero2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profiler_counts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat

from bench_train import make_dataset  # noqa: E402
from profiler_counts import kernel_launches, kernel_ms, sync_points  # noqa: E402

from axolotl_minicpmv import MiniCPMV, load_tokenizer  # noqa: E402
from axolotl_minicpmv.integration.collator import MiniCPMVDataCollator  # noqa: E402
from axolotl_minicpmv.integration.compiled_layers import compile_decoder_layers  # noqa: E402
from axolotl_minicpmv.integration.data import prepare_dataset_file  # noqa: E402
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS  # noqa: E402
from axolotl_minicpmv.integration.prompt_strategy import MiniCPMVChatStrategy  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import official_config  # noqa: E402
from axolotl_minicpmv.testing.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402


def cuda_time(fn, runs: int = 4) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs


def seed_batches(count: int) -> list[dict]:
    work = Path(tempfile.mkdtemp())
    tokenizer = load_tokenizer(write_tiny_tokenizer(work / "tok"))
    prepared = prepare_dataset_file(make_dataset(work / "data", 2 * count), work / "prepared")
    strategy = MiniCPMVChatStrategy(tokenizer, sequence_len=4096)
    rows = [strategy.tokenize_prompt(r) for r in pq.read_table(prepared.path).to_pylist()]
    collator = MiniCPMVDataCollator(tokenizer, pad_to_multiple_of=64)
    batches = [collator(rows[i : i + 2]) for i in range(0, 2 * count, 2)]
    return [{k: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda()) for k, v in b.items()} for b in batches]


def lora_model():
    from peft import LoraConfig, get_peft_model

    config = official_config()
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = MiniCPMV(config).to(torch.bfloat16)
    lora = LoraConfig(r=64, lora_alpha=64, target_modules=DEFAULT_TARGETS, modules_to_save=["vpm", "resampler", "embed_tokens"])
    model = get_peft_model(model, lora)
    model.train()
    return model


def step_functions(model, batches):
    """(forward+backward of the whole model, of the vision part alone), each on the next of `batches` in turn."""
    state = {"i": 0}

    def next_batch():
        state["i"] += 1
        return batches[state["i"] % len(batches)]

    def step():
        model(**next_batch()).loss.backward()

    def vision_only():
        batch = next_batch()
        model.base_model.model.get_image_features(batch["pixel_values"], batch["vision_order"]).float().sum().backward()

    return step, vision_only


def time_fwd_bwd(model, batches, tag: str, result: dict) -> None:
    """Forward+backward and the vision part alone, with and without gradient checkpointing."""
    step, vision_only = step_functions(model, batches)
    for checkpointing in (True, False):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        name = f"{tag}_{'gc' if checkpointing else 'no_gc'}"
        start = time.perf_counter()
        step()  # first call: compilation when compiled
        torch.cuda.synchronize()
        result[f"first_call_s_{name}"] = round(time.perf_counter() - start, 1)
        torch.cuda.reset_peak_memory_stats()
        result[f"fwd_bwd_s_{name}"] = round(cuda_time(step), 3)
        result[f"vision_fwd_bwd_s_{name}"] = round(cuda_time(vision_only), 3)
        result[f"peak_gib_{name}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        result[f"kernel_ms_{name}"] = round(kernel_ms(events), 1)
        result[f"host_ms_{name}"] = round(sum(e.self_cpu_time_total for e in events) / 1e3, 1)
        result[f"kernel_launches_{name}"] = kernel_launches(events)
        print(f"== {name}\n" + events.table(sort_by="self_device_time_total", row_limit=14), flush=True)
        print(json.dumps(result), flush=True)
    model.zero_grad(set_to_none=True)


def deepspeed_breakdown(model, batches, config_path: str, result: dict, steps: int = 12) -> None:
    """The optimizer step and DeepSpeed's gradient handling, which fwd+bwd alone leaves out."""
    import deepspeed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    config = json.loads(Path(config_path).read_text())
    config.update(
        bf16={"enabled": True},
        fp16={"enabled": False},
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
        train_batch_size=2,
        train_micro_batch_size_per_gpu=2,
        zero_allow_untested_optimizer=True,
    )
    model.gradient_checkpointing_disable()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    phases = {"forward": [], "backward": [], "step": []}
    for index in range(steps):
        batch = batches[index % len(batches)]
        marks = [time.perf_counter()]
        loss = engine(**batch).loss
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        engine.backward(loss)
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        engine.step()
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if index >= 2:
            for (name, values), begin, end in zip(phases.items(), marks, marks[1:]):
                values.append(end - begin)
    for name, values in phases.items():
        result[f"ds_{name}_s"] = round(statistics.median(values), 3)

    def whole_step(batch):
        engine.backward(engine(**batch).loss)
        engine.step()

    result["ds_step_unsynced_s"] = round(cuda_time(lambda: whole_step(batches[0]), runs=6), 3)
    result["ds_step_sync_points"] = sync_points(lambda: whole_step(batches[1]))
    result["ds_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="also time with the decoder layers compiled in place")
    parser.add_argument("--deepspeed", help="a DeepSpeed config: time a real engine's forward / backward / step")
    args = parser.parse_args()

    batches = seed_batches(4)
    result = {
        "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
        "images_per_batch": [int(sum(len(p) for p in b["pixel_values"])) for b in batches],
        "size_groups_per_batch": [len(b["pixel_values"]) for b in batches],
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    model = lora_model()
    time_fwd_bwd(model, batches, "eager", result)
    if args.compile:
        start = time.perf_counter()
        result["compiled_layers"] = compile_decoder_layers(model)
        time_fwd_bwd(model, batches, "compiled", result)
        result["compile_setup_s"] = round(time.perf_counter() - start, 1)
    if args.deepspeed:
        # A fresh model: DeepSpeed casts every weight to bf16 (PEFT keeps LoRA's in fp32), which graphs
        # traced above would not expect.
        del model
        deepspeed_breakdown(lora_model(), batches, args.deepspeed, result)


if __name__ == "__main__":
    main()
