"""benchmarks/train_flops.py: the model FLOPs per training sample behind bench_train.py's MFU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from train_flops import ModelShape, model_shape, sample_flops  # noqa: E402

from axolotl_minicpmv import MiniCPMVConfig  # noqa: E402
from axolotl_minicpmv.integration.lora_targets import DEFAULT_TARGETS  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import official_config  # noqa: E402


def test_sample_flops_by_hand():
    shape = ModelShape(
        vision_linear=10,
        vision_width=2,
        vision_blocks=3,
        resampler=5,
        decoder_linear=7,
        hidden=4,
        layers=2,
        vocab=11,
        lora=1,
        patch_size=14,
    )
    flops = sample_flops(shape, [(28, 42)], tokens=5, supervised=3)
    # 6 patches: forward 2*10*6 + 4*36*2*3 = 984, trained in full: x3
    assert flops["vision"] == 2952
    assert flops["resampler"] == 3 * 2 * 5 * 6
    # frozen decoder: forward (2*7*5 + 4*25*4*2 = 870) and its input gradients, plus LoRA trained: 3*2*1*5
    assert flops["decoder"] == 2 * 870 + 30
    assert flops["lm_head"] == 2 * 2 * 4 * 11 * 3
    assert flops["total"] == 2952 + 180 + 1770 + 528


def test_model_shape_of_the_official_config():
    shape = model_shape(official_config(), 64, DEFAULT_TARGETS)
    assert shape.vision_blocks == 26  # SigLIP's 27 blocks without the last (drop_vision_last_layer)
    assert shape.vision_width == 1152
    assert shape.decoder_linear == 40 * (4 * 2304 * 2304 + 3 * 2304 * 5760)  # q, k, v, o and gate, up, down
    assert shape.lora == 40 * 3 * 64 * (2304 + 2304)  # rank 64 on q, k and v
    assert shape.vocab == 122753


def test_bench_train_counts_the_images_of_each_sample(tiny_checkpoint, tmp_path):
    from bench_train import training_flops

    Image.new("RGB", (448, 448), "red").save(tmp_path / "square.jpg")
    Image.new("RGB", (1344, 448), "blue").save(tmp_path / "wide.jpg")
    turns = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."}]
    data = tmp_path / "train.json"
    shape = model_shape(MiniCPMVConfig.from_pretrained(tiny_checkpoint), 8, DEFAULT_TARGETS)
    one_image = sample_flops(shape, [(448, 448)], tokens=0, supervised=0)["vision"]

    data.write_text(json.dumps([{"id": "a", "image": "square.jpg", "conversations": turns}]))
    square = training_flops(tiny_checkpoint, data, {"lora_r": 8, "minicpmv_max_slice_nums": 9})
    assert square["vision"] == one_image  # 448x448: the source image alone, no slices

    data.write_text(json.dumps([{"id": "b", "image": "wide.jpg", "conversations": turns}]))
    wide = training_flops(tiny_checkpoint, data, {"lora_r": 8, "minicpmv_max_slice_nums": 9})
    assert wide["vision"] > 3 * one_image  # a source image and its slices
    assert wide["total"] > square["total"] > 0
