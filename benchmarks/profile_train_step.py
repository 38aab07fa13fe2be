"""Where a training step of the seed's recipe spends its time (real size, random bf16 weights, one GPU).

Builds batches of 2 seed-shaped samples with the plugin's own data path (prepare -> prompt strategy ->
collator), wraps the model like the Axolotl run (LoRA r 64 on q|k|v, vision tower / resampler /
embeddings trained in full), and times forward+backward with and without gradient checkpointing,
plus the vision part alone. No optimizer step (DeepSpeed's is measured by bench_train.py).

    python benchmarks/profile_train_step.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import make_dataset  # noqa: E402

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig, load_tokenizer  # noqa: E402
from axolotl_minicpmv.collator import MiniCPMVDataCollator  # noqa: E402
from axolotl_minicpmv.data import prepare_dataset_file  # noqa: E402
from axolotl_minicpmv.lora_targets import DEFAULT_TARGETS  # noqa: E402
from axolotl_minicpmv.minicpmv_chat import MiniCPMVChatStrategy  # noqa: E402
from axolotl_minicpmv.tiny_checkpoint import OFFICIAL_CONFIG, _model_kwargs  # noqa: E402
from axolotl_minicpmv.tokenization import write_tiny_tokenizer  # noqa: E402


def cuda_time(fn, runs: int = 4) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs


def main() -> None:
    from peft import LoraConfig, get_peft_model

    work = Path(tempfile.mkdtemp())
    tokenizer = load_tokenizer(write_tiny_tokenizer(work / "tok"))
    prepared = prepare_dataset_file(make_dataset(work / "data", 8), work / "prepared")
    strategy = MiniCPMVChatStrategy(tokenizer, sequence_len=4096)
    rows = [strategy.tokenize_prompt(r) for r in pq.read_table(prepared.path).to_pylist()]
    collator = MiniCPMVDataCollator(tokenizer, pad_to_multiple_of=64)
    batches = [collator(rows[i : i + 2]) for i in range(0, 8, 2)]

    config = MiniCPMVConfig(**_model_kwargs(OFFICIAL_CONFIG))
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = MiniCPMV(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, target_modules=DEFAULT_TARGETS, modules_to_save=["vpm", "resampler", "embed_tokens"]))
    model.train()
    base = model.base_model.model

    def to_cuda(batch):
        return {k: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda()) for k, v in batch.items()}

    gpu_batches = [to_cuda(b) for b in batches]
    state = {"i": 0}

    def step():
        batch = gpu_batches[state["i"] % len(gpu_batches)]
        state["i"] += 1
        model(**batch).loss.backward()

    def vision_only():
        batch = gpu_batches[state["i"] % len(gpu_batches)]
        state["i"] += 1
        base.get_image_features(batch["pixel_values"], batch["vision_order"]).float().sum().backward()

    result = {"tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
              "images_per_batch": [int(sum(len(p) for p in b["pixel_values"])) for b in batches],
              "size_groups_per_batch": [len(b["pixel_values"]) for b in batches]}
    for checkpointing in (True, False):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        torch.cuda.reset_peak_memory_stats()
        tag = "gc" if checkpointing else "no_gc"
        result[f"fwd_bwd_s_{tag}"] = round(cuda_time(step), 3)
        result[f"vision_fwd_bwd_s_{tag}"] = round(cuda_time(vision_only), 3)
        result[f"peak_gib_{tag}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    model.zero_grad(set_to_none=True)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
