"""Training speed and memory of the seed's LoRA recipe at the real model size, through Axolotl's CLI.

Builds (once) a random full-size MiniCPM-V 2.0 checkpoint and a dataset shaped like the seed's
(3-turn conversations, images from 448x448 to 1344x1344), then runs
`accelerate launch -m axolotl.cli.train` on configs/minicpmv_lora.yml (r 64, q/k/v, vision tower +
resampler + embeddings trained, batch 2, gradient checkpointing, sequence_len 2048, 9 slices) with
the given DeepSpeed config. Reports samples/s over steady-state steps (the plugin logs
`minicpmv/samples_per_second` per step) and peak GPU memory (Axolotl's `memory/max_allocated`), and the
model FLOPs per sample of the dataset as trained (train_flops.py says what is counted) with the MFU they give
at the overall rate against --peak-tflops per GPU.

    python benchmarks/bench_train.py --deepspeed configs/deepspeed/zero2_offload.json --steps 20

`--num-processes N` trains on N GPUs of one host (data parallel); the logged rate counts all ranks'
samples, the memory figures are rank 0's GPU.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))
sys.path.insert(0, str(REPO / "benchmarks"))

from results_table import record, versions  # noqa: E402

WORDS = (
    "the a photo shows red blue green car house tree sky river people street sign table book window light small large left right".split()
)


ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_dataset(folder: Path, samples: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(samples):
        width, height = rng.randrange(448, 1345, 14), rng.randrange(448, 1345, 14)
        path = folder / "images" / f"{index:04d}.jpg"
        tint = (rng.randrange(256), rng.randrange(256), rng.randrange(256))  # drawn always: the same text on every run
        if not path.exists():  # smooth gradients: realistic JPEG sizes and decode times
            base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
            Image.blend(base, Image.new("RGB", (width, height), tint), 0.5).save(path, quality=85)
        turns = []
        for turn in range(3):
            question = sentence(rng, 12)
            turns += [
                {"role": "user", "content": ("<image>\n" if turn == 0 else "") + question},
                {"role": "assistant", "content": sentence(rng, 40)},
            ]
        rows.append({"id": f"bench-{index:04d}", "image": f"images/{path.name}", "conversations": turns})
    target = folder / "train.json"
    target.write_text(json.dumps(rows))
    return target


def training_flops(model_dir: Path, data: Path, cfg: dict) -> dict[str, float]:
    """Mean model FLOPs per sample of `data` under the run's config (its slices, LoRA rank and targets)."""
    from train_flops import dataset_flops, model_shape

    from axolotl_minicpmv import MiniCPMVConfig, load_tokenizer
    from axolotl_minicpmv.model.image_processing_minicpmv import load_image
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor

    config = MiniCPMVConfig.from_pretrained(model_dir)
    processor = MiniCPMVProcessor.from_config(load_tokenizer(model_dir), config, max_slice_nums=cfg.get("minicpmv_max_slice_nums"))
    shape = model_shape(config, cfg.get("lora_r") or 0, cfg.get("lora_target_modules"))
    return dataset_flops(shape, processor, json.loads(data.read_text()), lambda path: load_image(data.parent / path))


def accelerate_train(config: Path, num_processes: int) -> list[str]:
    """`accelerate launch` of Axolotl's train CLI on `num_processes` GPUs of this host; the config decides precision."""
    launch = ["launch", "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return ["accelerate", *launch, "-m", "axolotl.cli.train", str(config)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", default="configs/deepspeed/zero2_offload.json", help="a DeepSpeed config, or none (plain Trainer)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the steady-state median")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--num-processes", type=int, default=1, help="GPUs of this host to train on")
    parser.add_argument("--workdir", default="/tmp/minicpmv-bench")
    parser.add_argument("--config", default=str(REPO / "configs" / "minicpmv_lora.yml"))
    parser.add_argument("--set", nargs="+", action="extend", default=[], help="extra YAML overrides key=value (YAML-parsed values)")
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="dense bf16 rate of one GPU for the MFU (790: the lent H200's, per its notes)"
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.jsonl")))
    args = parser.parse_args(argv)
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps {args.steps} leaves no steady-state step after --warmup-steps {args.warmup_steps}")
    return args


def run_training(command: list[str], log, grace_s: float = 20) -> int:
    """Run the training command in its own process group; its exit status. Stopped from outside (SIGTERM, as
    `timeout` sends, or Ctrl-C), it stops the whole group, so no trainer is left holding the GPU for the next
    run, and returns -SIGTERM: the steps logged so far are still recorded. Further signals during that cleanup
    are ignored, so they cannot cut it short."""
    child = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True
    )

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop), signal.getsignal(signal.SIGINT)
    try:
        return child.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        print(f"bench_train: stopped from outside; the training process group {child.pid} was stopped", file=sys.stderr)
        return -signal.SIGTERM
    finally:
        with contextlib.suppress(ProcessLookupError):  # the trainer's own children, if it left any
            os.killpg(child.pid, signal.SIGKILL)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def main() -> None:
    args = parse_args()

    work = Path(args.workdir)
    model_dir = work / "model"
    if not (model_dir / "model.safetensors.index.json").exists():
        from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(model_dir, full_size=True)  # drawn on the GPU: give its memory back to the trainer
        torch.cuda.empty_cache()
    data = make_dataset(work / "data", args.samples)

    cfg = yaml.safe_load(Path(args.config).read_text())
    deepspeed = "none" if args.deepspeed == "none" else Path(args.deepspeed).stem
    tag = f"{Path(args.config).stem}-{deepspeed}"
    cfg.update(
        base_model=str(model_dir),
        datasets=[{"path": str(data), "type": "axolotl_minicpmv.minicpmv_chat"}],
        dataset_prepared_path=str(work / "prepared"),
        output_dir=str(work / f"out-{tag}"),
        max_steps=args.steps,
        deepspeed=None if args.deepspeed == "none" else str(REPO / args.deepspeed),
        save_strategy="no",
        logging_steps=1,
        val_set_size=0.0,
    )
    cfg.pop("save_steps", None)
    cfg.pop("eval_steps", None)
    for item in args.set:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    config_path = work / f"bench-{tag}.yml"
    config_path.write_text(yaml.safe_dump(cfg))
    flops = training_flops(model_dir, data, cfg)

    command = accelerate_train(config_path, args.num_processes)
    log_path = work / f"train-{tag}-{time.strftime('%H%M%S')}.log"  # one per run: variants of a tag keep their logs
    with open(log_path, "w") as log:
        rc = run_training(command, log)
    steps = [
        ast.literal_eval(line[line.index("{") :].strip())
        for line in log_path.read_text().splitlines()
        if "'minicpmv/samples_per_second'" in line and "{" in line
    ]
    rates = [float(s["minicpmv/samples_per_second"]) for s in steps]
    steady = rates[args.warmup_steps :]

    overall = statistics.harmonic_mean(steady) if steady else None
    result = {
        "bench": "train",
        "config": Path(args.config).stem,
        "deepspeed": deepspeed,
        "processes": args.num_processes,
        "rc": rc,
        "steps_logged": len(steps),
        "samples_per_second_median": statistics.median(steady) if steady else None,
        "samples_per_second_by_step": rates,
        # all steady-state samples over the time they took: each rate covers one step of the same samples
        "samples_per_second_overall": round(overall, 3) if overall else None,
        "model_tflops_per_sample": {part: round(value / 1e12, 3) for part, value in flops.items()},
        "mfu_overall": round(flops["total"] * overall / (args.peak_tflops * 1e12 * args.num_processes), 4) if overall else None,
        "peak_tflops_per_gpu": args.peak_tflops,
        "peak_mem_allocated_gib": max((float(s.get("memory/max_allocated (GiB)", 0)) for s in steps), default=None),
        "peak_mem_active_gib": max((float(s.get("memory/max_active (GiB)", 0)) for s in steps), default=None),
        "device_reserved_gib": max((float(s.get("memory/device_reserved (GiB)", 0)) for s in steps), default=None),
        "losses": [float(s["loss"]) for s in steps],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": date.today().isoformat(),
        "overrides": args.set,
        "versions": versions("torch", "transformers", "peft", "axolotl", "deepspeed"),
        # the CUDA allocator setting changes the speed (`axolotl train` sets expandable segments itself)
        "command": "".join(f"{k}={os.environ[k]} " for k in ALLOCATOR_ENV if k in os.environ) + "python " + " ".join(sys.argv),
        "log": str(log_path),
    }
    record(result, Path(args.out))
    if rc != 0:
        print(log_path.read_text()[-6000:])
        sys.exit(rc)


if __name__ == "__main__":
    main()
