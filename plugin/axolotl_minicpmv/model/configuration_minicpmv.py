"""Configuration of MiniCPM-V 2.0, read from the official `config.json` unchanged.

The official file is flat (decoder, vision and slicing keys side by side) and names remote code
in `auto_map`; we keep both so a checkpoint we save loads with the official code too.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class MiniCPMVConfig(PreTrainedConfig):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 122753,
        hidden_size: int = 2304,
        intermediate_size: int = 5760,
        num_hidden_layers: int = 40,
        num_attention_heads: int = 36,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.1,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        pretraining_tp: int = 1,
        # MiniCPM's width/depth scalings (muP-style)
        scale_emb: float = 12,
        dim_model_base: int = 256,
        scale_depth: float = 1.4,
        # vision tower, resampler and slicing
        vision_encoder: str = "vit_so400m_patch14_siglip_384.webli",
        drop_vision_last_layer: bool = True,
        query_num: int = 64,
        image_size: int = 448,
        patch_size: int = 14,
        slice_mode: bool = True,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        mm_use_im_start_end: bool = True,
        vision_config: dict | None = None,
        **kwargs,
    ):
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling={rope_scaling!r} is not supported: MiniCPM-V 2.0 uses plain RoPE (null)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.pretraining_tp = pretraining_tp
        self.mlp_bias = False  # read by transformers' LlamaMLP, which the decoder reuses
        self.scale_emb = scale_emb
        self.dim_model_base = dim_model_base
        self.scale_depth = scale_depth
        self.vision_encoder = vision_encoder
        self.drop_vision_last_layer = drop_vision_last_layer
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = patch_size
        self.slice_mode = slice_mode
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.mm_use_im_start_end = mm_use_im_start_end
        # Only tiny test checkpoints set this: keyword arguments for timm.create_model that
        # shrink the SigLIP tower (depth, embed_dim, ...). The official config has none.
        self.vision_config = vision_config
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
