"""`python -m axolotl.cli.train` on several CPU processes (gloo), for tests/test_ddp_cpu.py.

Axolotl 0.19 assumes CUDA as soon as WORLD_SIZE > 1, in two places; this replaces exactly those and
then runs the real CLI:
- `axolotl.utils.environment.check_cuda_p2p_support` asks CUDA whether two GPUs reach each other (a
  RuntimeError without a driver). Its answer only sets NCCL_P2P_DISABLE, which gloo does not read.
- `normalize_config` sets `device_map = {"": LOCAL_RANK}`, which transformers reads as cuda:LOCAL_RANK.
After training, each rank writes its trainable parameters to `<output_dir>/rank<R>-trainable.safetensors`
so the test can check that the ranks stayed in step (only rank 0 saves the adapter).
"""

import os
from pathlib import Path

import axolotl.cli.config as cli_config
import axolotl.cli.train as cli_train
import axolotl.utils.environment as environment
import fire
from axolotl.train import train
from safetensors.torch import save_file

environment.check_cuda_p2p_support = lambda: True
normalize_config = cli_config.normalize_config


def normalize_config_on_cpu(cfg):
    normalize_config(cfg)
    cfg.device_map = {"": "cpu"}


def train_and_save_each_rank(cfg, dataset_meta):
    model, tokenizer, trainer = train(cfg=cfg, dataset_meta=dataset_meta)
    trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, Path(cfg.output_dir) / f"rank{os.environ['RANK']}-trainable.safetensors")
    return model, tokenizer, trainer


cli_config.normalize_config = normalize_config_on_cpu
cli_train.train = train_and_save_each_rank  # do_train takes `train` from its module's globals when set

if __name__ == "__main__":
    fire.Fire(cli_train.do_cli)
