"""GPU check: runs through Axolotl's CLI (DeepSpeed ZeRO-2 / ZeRO-3, QLoRA) save adapters that export and reload.

For each DeepSpeed config (or `none`): train the tiny generated checkpoint
for a few steps with `accelerate launch -m axolotl.cli.train`, export `adapter` and `merged`, reload
both, and compare their logits on a fixed image prompt (fp32). Prints one JSON line per config.

    python benchmarks/gpu_checks/check_gpu_runs.py configs/deepspeed/zero2.json configs/deepspeed/zero3.json
    python benchmarks/gpu_checks/check_gpu_runs.py none --set adapter=qlora load_in_4bit=true --tag qlora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugin"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import accelerate_train  # noqa: E402


def run(command: list[str], log: Path) -> int:
    with open(log, "w") as handle:
        return subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deepspeed", nargs="+")
    parser.add_argument("--workdir", default="/tmp/minicpmv-ds")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="extra YAML overrides key=value")
    parser.add_argument("--tag", default=None, help="name of the run (default: the DeepSpeed config's name)")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from axolotl_minicpmv import MiniCPMV, load_model, load_tokenizer
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor, group_by_size, image_bounds
    from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

    work = Path(args.workdir)
    base = work / "tiny"
    if not (base / "config.json").exists():
        make_tiny_checkpoint(base)
    for ds in args.deepspeed:
        tag = args.tag or Path(ds).stem
        cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yml").read_text())
        cfg.update(
            base_model=str(base),
            output_dir=str(work / f"out-{tag}"),
            dataset_prepared_path=str(work / "prepared"),
            deepspeed=None if ds == "none" else str(REPO / ds),
            bf16=True,
            max_steps=args.steps,
            save_steps=args.steps,
            eval_steps=args.steps,
            datasets=[{"path": str(REPO / "examples/data/train.json"), "type": "axolotl_minicpmv.minicpmv_chat"}],
            test_datasets=[{"path": str(REPO / "examples/data/eval.json"), "type": "axolotl_minicpmv.minicpmv_chat", "split": "train"}],
        )
        for item in args.set:
            key, value = item.split("=", 1)
            cfg[key] = yaml.safe_load(value)
        config = work / f"{tag}.yml"
        config.write_text(yaml.safe_dump(cfg))
        start = time.time()
        rc = run(accelerate_train(config, args.num_processes), work / f"train-{tag}.log")
        result = {"run": tag, "deepspeed": ds, "overrides": args.set, "train_rc": rc, "train_s": round(time.time() - start, 1)}
        if rc == 0:
            for fmt in ("adapter", "merged"):
                result[f"export_{fmt}_rc"] = run(
                    [
                        sys.executable,
                        "-m",
                        "axolotl_minicpmv",
                        "export",
                        str(config),
                        "--format",
                        fmt,
                        "--out",
                        str(work / f"{tag}-{fmt}"),
                        "--overwrite",
                        "--dtype",
                        "float32",
                    ],
                    work / f"export-{tag}-{fmt}.log",
                )
            tokenizer = load_tokenizer(base)
            image = Image.open(REPO / "examples/data/images/clock.jpg")
            processor = MiniCPMVProcessor.from_pretrained(base)
            ids = processor.encode_prompt(processor.chat_prompt([{"role": "user", "content": "What time is it?"}], image)).unsqueeze(0)
            pixels, order = group_by_size(processor.pixel_values(image))
            bound = image_bounds(ids, tokenizer.im_start_id, tokenizer.im_end_id)
            logits = {}
            for name, model in {
                "base": MiniCPMV.from_pretrained(base, dtype=torch.float32),
                "adapter": load_model(base, adapter=work / f"{tag}-adapter", dtype=torch.float32),
                "merged": MiniCPMV.from_pretrained(work / f"{tag}-merged", dtype=torch.float32),
            }.items():
                with torch.inference_mode():
                    logits[name] = model.eval()(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound).logits
            result["merged_vs_adapter_max_abs_diff"] = float((logits["merged"] - logits["adapter"]).abs().max())
            result["adapter_vs_base_max_abs_diff"] = float((logits["adapter"] - logits["base"]).abs().max())
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
