#!/usr/bin/env python3
"""Regenerate the demo's scoring task in examples/colours/: name the colour of a solid-colour picture in one word.

    python examples/make_colour_data.py

A task the tiny random checkpoint learns on a CPU in the demo's budget, so that `minicpmv-predict` shows a base score
near 0 and a fine-tuned score near 1. Pictures are small PNGs of one colour (the shade and the size vary, seeded);
train.json and test.json (held out: other shades and sizes) are lists in the training format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent / "colours"
COLOURS = {"red": (210, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 200), "white": (245, 245, 245)}
QUESTION = "What colour is this picture? Answer with one word."
PER_COLOUR = {"train": 6, "test": 3}
SEED = 7


def main() -> None:
    rng = random.Random(SEED)
    (ROOT / "images").mkdir(parents=True, exist_ok=True)
    for split, count in PER_COLOUR.items():
        samples = []
        for k in range(count):
            for name, rgb in COLOURS.items():
                shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)
                size = (rng.randrange(32, 97, 8), rng.randrange(32, 97, 8))
                file = f"images/{split}-{name}-{k}.png"
                Image.new("RGB", size, shade).save(ROOT / file)
                samples.append(
                    {
                        "id": f"{split}-{name}-{k}",
                        "image": file,
                        "conversations": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": name}],
                    }
                )
        rng.shuffle(samples)
        (ROOT / f"{split}.json").write_text(json.dumps(samples, indent=1) + "\n")
        print(f"wrote {ROOT / f'{split}.json'}: {len(samples)} samples")


if __name__ == "__main__":
    main()
