"""Tiny random MiniCPM-V 2.0 checkpoints in the exact official on-disk layout.

Same files as `openbmb/MiniCPM-V-2` (config.json with the official keys and remote-code `auto_map`,
two bf16 safetensors shards + index, sentencepiece tokenizer with the official special pieces),
only small: tests, the README demo and offline users run the whole pipeline on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model.configuration_minicpmv import MiniCPMVConfig
from .tiny_tokenizer import write_tiny_tokenizer

# The official config.json of openbmb/MiniCPM-V-2 (keys and values), which tiny configs shrink.
OFFICIAL_CONFIG = {
    "_name_or_path": "openbmb/MiniCPM-V-2",
    "architectures": ["MiniCPMV"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
    "bos_token_id": 1,
    "dim_model_base": 256,
    "drop_vision_last_layer": True,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2304,
    "image_size": 448,
    "initializer_range": 0.1,
    "intermediate_size": 5760,
    "max_position_embeddings": 4096,
    "max_slice_nums": 9,
    "mm_use_im_start_end": True,
    "model_type": "minicpmv",
    "num_attention_heads": 36,
    "num_hidden_layers": 40,
    "num_key_value_heads": 36,
    "patch_size": 14,
    "pretraining_tp": 1,
    "query_num": 64,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "scale_depth": 1.4,
    "scale_emb": 12,
    "scale_resolution": 448,
    "slice_mode": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
    "vocab_size": 122753,
}

GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"}

PREPROCESSOR_CONFIG = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "auto_map": {
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
    },
    "processor_class": "MiniCPMVProcessor",
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "image_feature_size": 64,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
}

# Small enough for CPU tests; query_num stays 64 so prompt layouts are the real ones.
TINY_SIZES = {
    "hidden_size": 128,  # the resampler uses hidden_size // 128 heads
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    # timm overrides of the SigLIP tower (the official config has no such key)
    "vision_config": {"embed_dim": 64, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
}


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, full_size: bool = False) -> Path:
    """Write a seeded random checkpoint + tiny tokenizer to `out_dir` and return the path.

    `full_size=True` keeps the official sizes (2.8B parameters, vocab 122,753; built on the GPU when
    there is one): benchmarks use it, since speed does not depend on the weights' values.
    """
    from ..model.modeling_minicpmv import MiniCPMV

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out, seed=seed)
    sizes = {} if full_size else {**TINY_SIZES, "vocab_size": _sentencepiece_vocab_size(out / "tokenizer.model")}
    config_dict = {**OFFICIAL_CONFIG, **sizes, "_name_or_path": str(out)}

    torch.manual_seed(seed)
    device = "cuda" if full_size and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = MiniCPMV(MiniCPMVConfig(**_model_kwargs(config_dict))).to(dtype)
    # Two shards, as the official release has; the shard size is picked from the model size.
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(out, max_shard_size=int(total * 0.6))
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=4) + "\n")
    return out


# A trained decoder's weight scale (about 1/sqrt(hidden size)), for numerics checks at the real size. The config's
# initializer_range of 0.1 makes every decoder layer amplify its input about fivefold at width 2,304: the random
# network is chaotic, and bf16 rounding alone moves its gradients and logits by about their own size
# (benchmarks/profiling/bf16_gradient_noise.py; benchmarks/RESULTS.md, 2026-12-07), so no bf16 path can be judged.
TRAINED_DECODER_STD = 0.02


def official_config(**overrides) -> MiniCPMVConfig:
    """The official MiniCPM-V 2.0 config at its real sizes, with `overrides` (e.g. initializer_range)."""
    return MiniCPMVConfig(**{**_model_kwargs(OFFICIAL_CONFIG), **overrides})


def _model_kwargs(config_dict: dict) -> dict:
    return {
        k: v
        for k, v in config_dict.items()
        if k not in {"_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version"}
    }


def _sentencepiece_vocab_size(model_file: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
