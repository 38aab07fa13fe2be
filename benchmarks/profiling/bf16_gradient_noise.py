"""How far bf16 gradients of the random decoder are from float32's, at the real width, per init scale (CPU).

check_train_numerics.py judges each training setting against bf16 rounding; that only works where bf16
gradients carry signal. This builds the MiniCPM decoder at its real width with few layers and a small
vocabulary, takes one loss/backward on 256 random tokens in float32 and in bf16 from the same weights, and
prints each parameter group's relative L2 gradient difference for the config's initializer_range (0.1) and 0.02.

    python benchmarks/profiling/bf16_gradient_noise.py [--layers 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))

from axolotl_minicpmv.model.modeling_minicpmv import MiniCPMForCausalLM  # noqa: E402
from axolotl_minicpmv.testing.tiny_checkpoint import OFFICIAL_CONFIG, TRAINED_DECODER_STD, official_config  # noqa: E402

GROUPS = {"embeddings": "embed_tokens", "attention": "self_attn", "mlp": "mlp", "lm_head": "lm_head"}


def gradients(model, ids) -> tuple[float, dict]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()
    for std in (OFFICIAL_CONFIG["initializer_range"], TRAINED_DECODER_STD):
        overrides = {"num_hidden_layers": args.layers, "vocab_size": args.vocab, "initializer_range": std}
        torch.manual_seed(0)
        model = MiniCPMForCausalLM(official_config(**overrides)).float()
        ids = torch.randint(0, args.vocab, (1, 256))
        loss32, g32 = gradients(model, ids)
        loss16, g16 = gradients(copy.deepcopy(model).to(torch.bfloat16), ids)
        rel = {}
        for group, marker in GROUPS.items():
            names = [n for n in g32 if marker in n]
            diff = torch.cat([(g16[n] - g32[n]).flatten() for n in names]).norm()
            rel[group] = round((diff / torch.cat([g32[n].flatten() for n in names]).norm()).item(), 3)
        print(
            json.dumps(
                {
                    "layers": args.layers,
                    "init_std": std,
                    "loss_float32": round(loss32, 4),
                    "loss_bf16": round(loss16, 4),
                    "grad_rel_diff": rel,
                }
            )
        )


if __name__ == "__main__":
    main()
