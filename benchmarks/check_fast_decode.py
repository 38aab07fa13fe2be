"""GPU check: the fast decode path (static KV cache + torch.compile) emits the plain path's tokens.

Real config, random weights, greedy decoding of 64 tokens from a fixed image prompt, in float32 and
bfloat16. Prints one JSON line per dtype.

    python benchmarks/check_fast_decode.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_chat import picture, prompt_embeds  # noqa: E402

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig, load_tokenizer  # noqa: E402
from axolotl_minicpmv.processing_minicpmv import MiniCPMVProcessor  # noqa: E402
from axolotl_minicpmv.tiny_checkpoint import OFFICIAL_CONFIG, _model_kwargs  # noqa: E402
from axolotl_minicpmv.tokenization import write_tiny_tokenizer  # noqa: E402


def main() -> None:
    import tempfile

    tokenizer = load_tokenizer(write_tiny_tokenizer(tempfile.mkdtemp()))
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        config = MiniCPMVConfig(**_model_kwargs(OFFICIAL_CONFIG))
        with torch.device("cuda"):
            model = MiniCPMV(config).to(dtype).eval()
        processor = MiniCPMVProcessor.from_config(tokenizer, config)
        embeds, _ = prompt_embeds(model, processor, picture(448, 448), 1)
        runs = {}
        for name, extra in {"plain": {}, "static": {"cache_implementation": "static", "disable_compile": True},
                            "static_compiled": {"cache_implementation": "static"}}.items():
            with torch.inference_mode():
                runs[name] = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"),
                                            do_sample=False, num_beams=1, max_new_tokens=64, min_new_tokens=64, pad_token_id=0, **extra)
        first_diff = lambda a, b: None if torch.equal(a, b) else int((a != b).nonzero()[0, 1])  # noqa: E731
        print(json.dumps({"dtype": str(dtype), "static_equals_plain": torch.equal(runs["static"], runs["plain"]),
                          "compiled_equals_plain": torch.equal(runs["static_compiled"], runs["plain"]),
                          "compiled_first_diff": first_diff(runs["static_compiled"], runs["plain"]),
                          "static_first_diff": first_diff(runs["static"], runs["plain"])}))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
