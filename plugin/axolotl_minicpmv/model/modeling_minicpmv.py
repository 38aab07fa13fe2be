"""MiniCPM-V 2.0 as a native transformers model: SigLIP tower (timm) + resampler + MiniCPM-2.4B decoder.

Module names follow the official checkpoint (`llm.`, `vpm.`, `resampler.`) so its 694 tensors load
unchanged, and the arithmetic follows the official remote code (embedding, residual and logit
scalings; RoPE applied in float32) so logits and answers are identical; see tests/test_modeling.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaMLP, eager_attention_forward, rotate_half
from transformers.utils import logging

from .checkpoint import check_checkpoint_dir, raise_on_incomplete_load
from .configuration_minicpmv import MiniCPMVConfig
from .conversation import InvalidInputError
from .packed_vision import encode_packed, packed_block, packs
from .processing_minicpmv import check_image_slots
from .resampler import Resampler, sincos_2d
from .transfer import to_device

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------- decoder (llm.)


class MiniCPMRotaryEmbedding(nn.Module):
    """Plain RoPE. cos/sin are made in float32 and rounded to the activation dtype, as the release does; they are
    handed out back in float32, the dtype the rotation computes in, so that the layers do not each convert them."""

    def __init__(self, config: MiniCPMVConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float() / self.dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype).float(), emb.sin().to(x.dtype).float()


def apply_rotary_pos_emb(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, length, heads, head_dim) queries and keys, stacked along the heads, in float32 and cast back,
    as the official decoder does (even in bf16). One pass over both: each elementwise step is one kernel for the
    two, which matters to a decoding step of ~50 small kernels a layer."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x = query_key.float()
    return (x * cos + rotate_half(x) * sin).to(query_key.dtype)


class MiniCPMRMSNorm(nn.Module):
    """RMSNorm as the release computes it (normalised in float32, rounded to the activation dtype, then scaled by
    the weight), through torch's rms_norm: one fused kernel on a GPU where the written-out formula takes six."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.weight * nn.functional.rms_norm(hidden_states, hidden_states.shape[-1:], eps=self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def block_mask_attention(module, query, key, value, block_mask: BlockMask, scaling: float, **kwargs) -> tuple[torch.Tensor, None]:
    """Flex attention under a BlockMask, as an attention interface function. Unlike transformers' own, it does not
    compile flex attention when called eagerly (an eager caller, such as the CPU decoding loop, gets flex's
    reference implementation; a compiled one, the fused kernel)."""
    return flex_attention(query, key, value, block_mask=block_mask, scale=scaling).transpose(1, 2), None


class MiniCPMAttention(nn.Module):
    def __init__(self, config: MiniCPMVConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.register_buffer("qkv_weight", None, persistent=False)  # see fuse_projections

    def project_qkv(self, hidden_states) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries and keys side by side, values): the rotation then runs once over both."""
        maps = (self.q_proj, self.k_proj, self.v_proj)
        if fused_applies(self.qkv_weight, *maps):
            qkv = nn.functional.linear(hidden_states, self.qkv_weight)
            return qkv.split([self.q_proj.out_features + self.k_proj.out_features, self.v_proj.out_features], -1)
        return torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states)], -1), self.v_proj(hidden_states)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query_key, value = self.project_qkv(hidden_states)
        query_key = apply_rotary_pos_emb(query_key.view(*input_shape, -1, self.head_dim), *position_embeddings)
        query, key = (x.transpose(1, 2) for x in query_key.split([self.config.num_attention_heads, self.config.num_key_value_heads], 2))
        value = value.view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] < key.shape[-2]:
                # a decoding step that sees only the static cache's first positions (FastDecoder's windows)
                key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if isinstance(attention_mask, BlockMask):  # FastDecoder's decoding step: only the cache blocks a row attends to
            attention = block_mask_attention
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class MiniCPMMLP(LlamaMLP):
    """transformers' SiLU-gated MLP, whose gate and up products can run as one (see fuse_projections)."""

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.register_buffer("gate_up_weight", None, persistent=False)

    def forward(self, x):
        if not fused_applies(self.gate_up_weight, self.gate_proj, self.up_proj):
            return super().forward(x)
        gate, up = nn.functional.linear(x, self.gate_up_weight).split([self.gate_proj.out_features, self.up_proj.out_features], -1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_linears(linears: list[nn.Linear], row_multiple: int = 1, stacked: torch.Tensor | None = None) -> torch.Tensor | None:
    """One weight for linear maps of the same input: their rows stacked in one tensor (zero rows added up to a
    multiple of `row_multiple`), and each map's weight re-pointed to its rows, so nothing is added to memory and
    both paths compute with the same values (an in-place update of a map's weight, such as an optimizer step or
    a LoRA merge, updates the stack). None where a map is not a plain bias-free nn.Linear (a LoRA wrapper, a
    quantized layer): it stays unfused. A `stacked` weight the maps still read their rows of is kept as it is:
    CUDA graphs recorded by an earlier FastDecoder point at its memory, which a new stack would free."""
    if any(type(linear) is not nn.Linear or linear.bias is not None for linear in linears):
        return None
    if stacked is not None and _reads_rows_of(stacked, linears):
        return stacked
    rows = sum(linear.out_features for linear in linears)
    padding = -rows % row_multiple
    stacked = torch.cat([linear.weight.detach() for linear in linears] + [linears[0].weight.new_zeros(padding, linears[0].in_features)])
    start = 0
    for linear in linears:
        linear.weight.data = stacked[start : start + linear.out_features]
        start += linear.out_features
    return stacked


def fused_applies(stacked: torch.Tensor | None, *linears: nn.Module) -> bool:
    """Use a stacked weight only without autograd (it is no parameter, so training goes through the maps
    themselves) and while every map is still the plain nn.Linear it was made from (not since wrapped by peft)
    reading its rows of the stack: a weight tensor replaced since (a safe LoRA merge, `.to(dtype)`) is used as
    it is. A compiled step (FastDecoder's) skips that last check: it keeps the weights it was compiled with."""
    if stacked is None or torch.is_grad_enabled() or any(type(linear) is not nn.Linear for linear in linears):
        return False
    return torch.compiler.is_compiling() or _reads_rows_of(stacked, linears)


def _reads_rows_of(stacked: torch.Tensor, linears) -> bool:
    address = stacked.data_ptr()
    for linear in linears:
        if linear.weight.data_ptr() != address:
            return False
        address += linear.weight.numel() * linear.weight.element_size()
    return True


class MiniCPMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniCPMVConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Each residual branch is damped by scale_depth / sqrt(depth) before it is added.
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out * self.residual_scale
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * self.residual_scale


class MiniCPMPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    config: MiniCPMVConfig
    base_model_prefix = "llm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniCPMDecoderLayer", "Block"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, MiniCPMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, Resampler):
            grid = int(module.query.shape[0] ** 0.5)
            init.copy_(module.pos_embed, sincos_2d(module.embed_dim, grid, grid))
            init.trunc_normal_(module.query, std=0.02)
            init.trunc_normal_(module.kv_proj.weight, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)
        elif isinstance(module, nn.Linear) and not _is_vision_or_resampler(self, module):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MiniCPMRMSNorm):
            init.ones_(module.weight)


def _is_vision_or_resampler(model: nn.Module, module: nn.Module) -> bool:
    """timm and the resampler initialise their own layers; the decoder's init must not overwrite them."""
    for name in ("vpm", "resampler"):
        owner = getattr(model, name, None)
        if owner is not None and any(module is m for m in owner.modules()):
            return True
    return False


class MiniCPMModel(MiniCPMPreTrainedModel):
    """The decoder stack (`llm.model.`)."""

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniCPMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MiniCPMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and past_key_values is None:
            use_cache = False  # a training step has no use for a key/value cache (and compiled layers would specialise on it)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values if use_cache else None)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel):
    """Decoder + `lm_head` (`llm.`); the final hidden state is divided by hidden_size / dim_model_base."""

    base_model_prefix = "model"

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("padded_head_weight", None, persistent=False)  # see fuse_projections
        self.post_init()

    def forward(self, labels=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("ignore_index", None)
        outputs = self.model(**kwargs)
        hidden = outputs.last_hidden_state
        loss = None if labels is None else self.causal_lm_loss(hidden, labels, num_items_in_batch)
        if loss is not None and self.training:
            # Training needs only the loss: full logits would be seq x 122,753 floats per sample.
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.project_logits(hidden[:, keep, :] / self.logit_scale)
        return CausalLMOutputWithPast(loss=loss, logits=logits.float(), past_key_values=outputs.past_key_values)

    def project_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if fused_applies(self.padded_head_weight, self.lm_head):
            return nn.functional.linear(hidden, self.padded_head_weight)[..., : self.lm_head.out_features]
        return self.lm_head(hidden)

    def fuse_projections(self) -> int:
        """For decoding: each layer's q/k/v products become one matrix product, and so do gate/up (fewer,
        larger kernels), and lm_head's weight gets zero rows up to a multiple of 64 (the 122,753-row vocabulary
        leaves the logits rows unaligned, and cuBLAS then picks a slow align-1 kernel; the padding logits are cut
        off). The separate maps keep their names and values (views of the stacked rows), so checkpoints, LoRA
        targets and training are unchanged; the stacked weights are non-persistent buffers, used only under
        no_grad / inference_mode. Call again after replacing a weight tensor (an in-place change needs nothing); a
        group already fused is left as it is.
        Returns the number of decoder groups fused."""
        self.padded_head_weight = fuse_linears([self.lm_head], row_multiple=64, stacked=self.padded_head_weight)
        fused = 0
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_weight = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], stacked=attn.qkv_weight)
            mlp.gate_up_weight = fuse_linears([mlp.gate_proj, mlp.up_proj], stacked=mlp.gate_up_weight)
            fused += (attn.qkv_weight is not None) + (mlp.gate_up_weight is not None)
        return fused

    @property
    def logit_scale(self) -> float:
        return self.config.hidden_size / self.config.dim_model_base

    def causal_lm_loss(self, hidden, labels, num_items_in_batch=None, chunk_size: int = 1024):
        """Next-token cross-entropy over supervised positions only, in chunks whose logits are recomputed in
        backward: the same value as cross-entropy on full float32 logits, at a fraction of the memory."""
        targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).to(hidden.device)
        supervised = (targets != -100).nonzero().squeeze(1)  # one host wait for the count, not one per selection
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised)
        targets = targets.index_select(0, supervised)
        total = hidden.sum() * 0.0  # keeps the graph connected when nothing is supervised
        # Under ZeRO-3 lm_head's weight is partitioned again by the time a recompute would run, so the
        # chunks keep their logits there (still only supervised rows, never the full sequence).
        recompute = not is_deepspeed_zero3_enabled()
        for start in range(0, len(targets), chunk_size):
            chunk = (rows[start : start + chunk_size], targets[start : start + chunk_size])
            if recompute:
                total = total + torch.utils.checkpoint.checkpoint(self._chunk_cross_entropy, *chunk, use_reentrant=False)
            else:
                total = total + self._chunk_cross_entropy(*chunk)
        count = num_items_in_batch if num_items_in_batch is not None else max(len(supervised), 1)
        if torch.is_tensor(count):
            count = count.to(total.device)
        return total / count

    def _chunk_cross_entropy(self, rows, targets):
        logits = self.lm_head(rows / self.logit_scale).float()
        return nn.functional.cross_entropy(logits, targets, reduction="sum")


# ---------------------------------------------------------------- vision tower (vpm.)


def build_vision_tower(config: MiniCPMVConfig) -> nn.Module:
    """timm SigLIP-so400m at any image size, without its attention-pool head (and last block)."""
    tower = timm.create_model(
        config.vision_encoder,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        dynamic_img_pad=True,
        **(getattr(config, "vision_config", None) or {}),  # set only by small test checkpoints
    )
    if getattr(tower, "attn_pool", None) is not None:
        tower.attn_pool = nn.Identity()
    if config.drop_vision_last_layer:
        tower.blocks = tower.blocks[:-1]
    return tower


# ---------------------------------------------------------------- the whole model


class MiniCPMV(MiniCPMPreTrainedModel, GenerationMixin):
    """MiniCPM-V 2.0. Images enter as `pixel_values` (a list of same-size stacks, see
    `processing_minicpmv.group_by_size`), `vision_order` and `image_bound` rows `(batch_row, start, end)`."""

    base_model_prefix = ""
    _input_embed_layer = "llm.model.embed_tokens"

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.llm = MiniCPMForCausalLM(config)
        self.vpm = build_vision_tower(config)
        self.resampler = Resampler(config.query_num, config.hidden_size, config.hidden_size // 128, self.vpm.embed_dim)
        self.vision_block = packed_block  # each tower block over packed patches (None: one tower call per image size)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an official-layout checkpoint (safetensors or .bin), refusing missing or mis-shaped tensors."""
        check_checkpoint_dir(pretrained_model_name_or_path)
        _keep_vision_unquantized(kwargs.get("quantization_config"))
        return_info = kwargs.pop("output_loading_info", False)
        # Let transformers report mismatched shapes instead of raising, so our error names them.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        raise_on_incomplete_load(pretrained_model_name_or_path, info)
        return (model, info) if return_info else model

    # embeddings -------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.llm.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.llm.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.llm.lm_head = value

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint, **kwargs
    ):
        super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs)
        self.vpm.set_grad_checkpointing(enable)  # timm keeps its own switch

    def encode_images(self, stack: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) pixels of same-size images -> (n, query_num, hidden) resampler outputs."""
        # The tower's own call (its pooling head is an identity) equals forward_features without prefix
        # tokens, and lets DeepSpeed ZeRO-3 gather the tower's direct parameters (pos_embed) via hooks.
        return self.resample(self.vpm(stack.to(self.vpm.pos_embed.dtype)), stack.shape[-2:])

    def resample(self, features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Tower features of images of `image_size` (height, width) pixels -> query_num resampler outputs each."""
        patch = self.vpm.patch_embed.patch_size[0]
        height, width = image_size
        return self.resampler(features, (math.ceil(height / patch), math.ceil(width / patch)))

    def get_image_features(self, pixel_values: list[torch.Tensor], vision_order: torch.Tensor | None = None, encode=None) -> torch.Tensor:
        """(num_images, query_num, hidden): each same-size stack goes through the tower in one call (`encode`,
        default `encode_images`: the inference fast path passes its compiled equal), or, for stacks of several
        sizes on a GPU in 16-bit, all of them in one packed pass (`packed_vision`; `vision_block` runs its blocks,
        None turns packing off). ZeRO-3 keeps the per-size calls: its hooks gather the tower's own parameters
        only when the tower itself is called."""
        if encode is None and len(pixel_values) > 1 and self.can_pack_images(pixel_values):
            logger.info_once("MiniCPM-V: images of several sizes go through the vision tower in one packed pass (flash varlen attention)")
            towers = encode_packed(self.vpm, pixel_values, run_block=self.vision_block)
            features = torch.cat([self.resample(tower, stack.shape[-2:]) for tower, stack in zip(towers, pixel_values, strict=True)])
        else:
            encode = encode or self.encode_images
            features = torch.cat([encode(stack) for stack in pixel_values])
        return features if vision_order is None else features[vision_order.to(features.device)]

    def can_pack_images(self, pixel_values: list[torch.Tensor]) -> bool:
        """Whether these stacks may go through the tower in one packed pass (`get_image_features` packs two or more)."""
        return (
            self.vision_block is not None
            and len(pixel_values) > 0
            and packs(self.vpm, pixel_values[0])
            and not is_deepspeed_zero3_enabled()
        )

    def embed_text(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.get_input_embeddings()(input_ids) * self.config.scale_emb

    def embed_inputs(self, input_ids, pixel_values=None, vision_order=None, image_bound=None, encode=None) -> torch.Tensor:
        """Token embeddings times scale_emb, with the resampler outputs written over the image slots."""
        if pixel_values is None or len(pixel_values) == 0:
            embeds = self.embed_text(input_ids)
            if self.training and any(p.requires_grad for p in (*self.vpm.parameters(), *self.resampler.parameters())):
                # Keep the vision tower and resampler in the graph on image-free batches so distributed
                # gradient reduction sees every trained parameter (as the official trainer does).
                dummy = torch.zeros(1, 3, 28, 28, device=embeds.device)
                embeds = embeds + self.get_image_features([dummy]).sum().to(embeds.dtype) * 0
            return embeds
        if image_bound is None:
            raise InvalidInputError("pixel_values were given without image_bound")
        return self.place_image_features(input_ids, self.get_image_features(pixel_values, vision_order, encode), image_bound)

    def place_image_features(self, input_ids, features: torch.Tensor, image_bound: torch.Tensor) -> torch.Tensor:
        """Token embeddings times scale_emb with `features[i]` written over the slots of `image_bound[i]`."""
        embeds = self.embed_text(input_ids)
        if len(image_bound) != len(features):
            raise InvalidInputError(f"{len(features)} images were given but the prompt has {len(image_bound)} image placeholders")
        if image_bound.device.type == "cpu":
            # Bounds already on the GPU come from the collator, which checked them on the host; reading
            # them back here would make the host wait for the vision tower in every training step.
            check_image_slots(image_bound, self.config.query_num)
        bound = to_device(image_bound, embeds.device)
        slots = bound[:, 1:2] + torch.arange(self.config.query_num, device=embeds.device)
        rows = bound[:, :1].expand_as(slots)
        return embeds.index_put((rows.reshape(-1), slots.reshape(-1)), features.reshape(-1, features.shape[-1]).to(embeds.dtype))

    # forward / generation ---------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: list[torch.Tensor] | None = None,
        vision_order: torch.LongTensor | None = None,
        image_bound: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None and input_ids is not None and (pixel_values is not None or self.training):
            inputs_embeds, input_ids = self.embed_inputs(input_ids, pixel_values, vision_order, image_bound), None
        return self.llm(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, pixel_values=None, vision_order=None, image_bound=None, is_first_iteration=False, **kwargs
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if is_first_iteration:  # images are consumed by the prefill step only
            inputs.update(pixel_values=pixel_values, vision_order=vision_order, image_bound=image_bound)
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beams and num_return_sequences copy each row; `image_bound` names its rows by index, which copies would not
        # follow. So the pictures go into the prompt's embeddings first, and the embeddings are copied.
        if expand_size > 1 and model_kwargs.get("pixel_values") is not None and model_kwargs.get("inputs_embeds") is None:
            images = [model_kwargs.pop(key, None) for key in ("pixel_values", "vision_order", "image_bound")]
            model_kwargs["inputs_embeds"] = self.embed_inputs(input_ids, *images)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        # The pad id (0, <unk>) is also the token of every image slot: deriving the mask from it would
        # hide the images. Without an explicit mask every position is attended.
        if inputs_tensor.dim() == 2 and not torch.is_floating_point(inputs_tensor):
            return torch.ones_like(inputs_tensor, dtype=torch.long)
        return super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)

    def chat(self, image, msgs, context=None, tokenizer=None, **kwargs):
        """The official `chat(image, msgs, context, tokenizer, ...)`; see `axolotl_minicpmv.inference.chat.chat`."""
        from ..inference.chat import chat  # the chat loop and its fast path live with the other inference code

        return chat(self, image, msgs, context=context, tokenizer=tokenizer, **kwargs)


# The vision tower and resampler stay in 16-bit under bitsandbytes (they are small and trained in full),
# and so does lm_head, as transformers does by default for causal LMs.
UNQUANTIZED_MODULES = ["vpm", "resampler", "llm.lm_head"]


def _keep_vision_unquantized(quantization_config) -> None:
    if quantization_config is not None and hasattr(quantization_config, "llm_int8_skip_modules"):
        skip = list(quantization_config.llm_int8_skip_modules or [])
        quantization_config.llm_int8_skip_modules = skip + [m for m in UNQUANTIZED_MODULES if m not in skip]
