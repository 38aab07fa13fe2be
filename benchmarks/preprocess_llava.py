#!/usr/bin/env python3
"""Benchmark (not a test): `axolotl preprocess` of a generated LLaVA-format file, samples/s and peak memory.

    python benchmarks/preprocess_llava.py [--samples 100000] [--images 10000] [--work /tmp/minicpmv-bench]

Writes SAMPLES LLaVA samples (a JSON list; `conversations` of {from, value}, `<image>\\n` at the start of the first
human turn) that reference IMAGES JPEG files of four sizes (sliced and unsliced layouts), then runs the real
`axolotl preprocess` on the tiny checkpoint's tokenizer: the plugin's streaming preparation (validation, image
headers, prepared Parquet) and Axolotl's tokenization and cache. Prints the plugin's own samples/s (from its log
line), the whole command's samples/s, and the peak memory of the process tree (PSS and summed RSS, psutil).
Goals (issue 15): at least 300 samples/s and at most 3 GiB on a 2-core machine. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZES = [(448, 448), (800, 600), (1200, 300), (200, 150)]


def make_data(work: Path, samples: int, images: int) -> Path:
    folder = work / "data"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        path = folder / "images" / f"{i:05d}.jpg"
        if not path.is_file():
            Image.new("RGB", SIZES[i % len(SIZES)], color=(i % 251, (7 * i) % 253, (13 * i) % 255)).save(path, quality=80)
    source = folder / "llava.json"
    if not source.is_file():
        rows = [
            {
                "id": f"s{i:06d}",
                "image": f"images/{i % images:05d}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat is in picture number {i}? Describe the colours."},
                    {"from": "gpt", "value": f"Picture {i} is a plain rectangle of one colour, number {i % images}."},
                ],
            }
            for i in range(samples)
        ]
        source.write_text(json.dumps(rows), encoding="utf-8")
    return source


def peak_memory(pid: int, stop: threading.Event, out: dict) -> None:
    """Largest sums over the process and all its children, sampled every 0.2 s: RSS (counts pages that forked
    tokenizing workers share with their parent once per process, so it overstates) and PSS (shares them out)."""
    rss = pss = 0
    try:
        root = psutil.Process(pid)
        while not stop.is_set():
            total_rss = total_pss = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                    total_rss, total_pss = total_rss + info.rss, total_pss + info.pss
                except psutil.Error:
                    pass
            rss, pss = max(rss, total_rss), max(pss, total_pss)
            time.sleep(0.2)
    except psutil.Error:
        pass
    out.update(rss=rss, pss=pss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/minicpmv-bench"))
    parser.add_argument("--num-proc", type=int, default=2, help="dataset_num_proc for Axolotl's tokenization")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from axolotl_minicpmv.testing.tiny_checkpoint import make_tiny_checkpoint

    checkpoint = work / "tiny-minicpmv"
    if not (checkpoint / "config.json").is_file():
        make_tiny_checkpoint(checkpoint)
    started = time.perf_counter()
    source = make_data(work, args.samples, args.images)
    print(
        f"data: {source} ({source.stat().st_size / 2**20:.1f} MiB, {args.samples} samples, {args.images} images) "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yml").read_text())
    cfg.update(
        base_model=str(checkpoint),
        datasets=[{"path": str(source), "type": "axolotl_minicpmv.minicpmv_chat"}],
        dataset_prepared_path=str(work / f"prepared-{time.time_ns()}"),
        output_dir=str(work / "out"),
        dataset_num_proc=args.num_proc,
    )
    cfg.pop("test_datasets", None)
    cfg.update(eval_strategy="no")
    cfg.pop("eval_steps", None)
    config = work / "bench.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
    }
    load_before = os.getloadavg()
    start = time.perf_counter()
    process = subprocess.Popen(
        [str(BIN / "axolotl"), "preprocess", str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stop, peak = threading.Event(), {}
    watcher = threading.Thread(target=peak_memory, args=(process.pid, stop, peak))
    watcher.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    (work / "preprocess.log").write_text(output)
    if process.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"axolotl preprocess failed ({process.returncode}); log: {work / 'preprocess.log'}")
    plugin = re.search(r"(\d+) samples validated and written to .*?\((\d+) read in ([\d.]+) s: (\d+) samples/s\)", output)
    print(
        f"plugin preparation: {plugin.group(2)} samples in {plugin.group(3)} s = {plugin.group(4)} samples/s"
        if plugin
        else "plugin line not found"
    )
    print(
        f"axolotl preprocess total: {seconds:.1f} s = {args.samples / seconds:.0f} samples/s (start-up, preparation, tokenization, cache)"
    )
    print(f"peak memory of the process tree: PSS {peak['pss'] / 2**30:.2f} GiB, RSS summed {peak['rss'] / 2**30:.2f} GiB")
    print(f"cpu cores: {os.cpu_count()}, load average before: {load_before[0]:.1f}, after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
