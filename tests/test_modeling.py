"""The model: official tensor names and shapes, the decoder's three MiniCPM scalings, RoPE, the
resampler, vision batching, image-slot splicing, training and attention backends.

Expected values come from the real config and the rules in MINICPMV.md, recomputed here by hand
(float64 reference forward, numpy sin-cos tables, a manual multi-head attention); never from
outputs of the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, REFERENCE
from PIL import Image

from axolotl_minicpmv import MiniCPMV, MiniCPMVConfig
from axolotl_minicpmv.model.processing_minicpmv import InvalidInputError, MiniCPMVProcessor, group_by_size, image_bounds
from axolotl_minicpmv.model.resampler import Resampler, sincos_2d

# ---------------------------------------------------------------- the real architecture (meta device)


@pytest.fixture(scope="module")
def real_config():
    return MiniCPMVConfig.from_pretrained(REFERENCE)


@pytest.fixture(scope="module")
def real_meta_model(real_config):
    with torch.device("meta"):
        return MiniCPMV(real_config)


def test_real_state_dict_names_are_exactly_the_official_ones(real_meta_model):
    index = json.loads((REFERENCE / "model.safetensors.index.json").read_text())
    official = set(index["weight_map"])
    assert len(official) == 694
    names = list(real_meta_model.state_dict())
    assert len(names) == len(set(names)) == 694
    assert set(names) - official == set(), "tensors the official checkpoint does not have"
    assert official - set(names) == set(), "official tensors the model does not have"


def test_real_shapes_follow_the_config(real_meta_model, real_config):
    c = real_config
    sd = real_meta_model.state_dict()
    hidden, vocab, inter, vision = c.hidden_size, c.vocab_size, c.intermediate_size, 1152
    assert (hidden, vocab, inter, c.num_hidden_layers) == (2304, 122753, 5760, 40)
    expected = {
        "llm.model.embed_tokens.weight": (vocab, hidden),
        "llm.lm_head.weight": (vocab, hidden),
        "llm.model.norm.weight": (hidden,),
        "llm.model.layers.39.self_attn.q_proj.weight": (hidden, hidden),
        "llm.model.layers.39.self_attn.k_proj.weight": (hidden, hidden),  # 36 kv heads: no GQA
        "llm.model.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "llm.model.layers.0.mlp.down_proj.weight": (hidden, inter),
        "vpm.pos_embed": (1, (384 // 14) ** 2, vision),  # 27x27 = 729 positions of SigLIP-384
        "vpm.patch_embed.proj.weight": (vision, 3, 14, 14),
        "vpm.blocks.25.mlp.fc1.weight": (4304, vision),
        "resampler.query": (c.query_num, hidden),
        "resampler.pos_embed": (c.query_num, hidden),
        "resampler.attn.in_proj_weight": (3 * hidden, hidden),
        "resampler.attn.in_proj_bias": (3 * hidden,),
        "resampler.attn.out_proj.weight": (hidden, hidden),
        "resampler.kv_proj.weight": (hidden, vision),
        "resampler.proj": (hidden, hidden),
        "resampler.ln_q.weight": (hidden,),
        "resampler.ln_kv.bias": (hidden,),
        "resampler.ln_post.weight": (hidden,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "llm.model.layers.40.self_attn.q_proj.weight" not in sd
    assert "vpm.blocks.26.attn.qkv.weight" not in sd, "the last SigLIP block is dropped"
    assert "resampler.kv_proj.bias" not in sd and "resampler.proj.bias" not in sd
    assert not any(k.startswith("vpm.attn_pool") or k.startswith("vpm.head") for k in sd)


def test_real_module_structure(real_meta_model):
    model = real_meta_model
    assert len(model.vpm.blocks) == 26
    assert model.vpm.embed_dim == 1152
    assert model.resampler.attn.num_heads == 2304 // 128 == 18
    for ln in (model.resampler.ln_q, model.resampler.ln_kv, model.resampler.ln_post):
        assert ln.eps == 1e-6
    assert model.llm.model.layers[0].residual_scale == pytest.approx(1.4 / math.sqrt(40))
    assert model.llm.model.norm.variance_epsilon == 1e-5
    assert model.llm.model.rotary_emb.inv_freq.shape == (2304 // 36 // 2,)


def test_real_parameter_count(real_meta_model):
    # MINICPMV.md: with q|k|v LoRA (r=64) on 40 layers the official model has 3,470,355,232
    # parameters; each LoRA adapter of a 2304x2304 projection adds 64 * (2304 + 2304).
    lora = 3 * 40 * 64 * (2304 + 2304)
    assert sum(p.numel() for p in real_meta_model.parameters()) == 3_470_355_232 - lora


# ---------------------------------------------------------------- tiny real models


@pytest.fixture
def fresh_model(tiny_checkpoint_fp32):
    """A private fp32 model that a test may modify."""
    return MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_tokenizer, tiny_model):
    return MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)


def _ids(tokenizer, text="<用户>Hello, what is in the picture?<AI>") -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)])


def _image_inputs(processor, tokenizer, image, text="Describe the image."):
    prompt = processor.chat_prompt([{"role": "user", "content": text}], image)
    ids = processor.encode_prompt(prompt).unsqueeze(0)
    pixels, order = group_by_size(processor.pixel_values(image))
    bound = image_bounds(ids, tokenizer.im_start_id, tokenizer.im_end_id)
    return ids, pixels, order, bound


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _reference_logits(model: MiniCPMV, input_ids: torch.Tensor) -> torch.Tensor:
    """MiniCPM decoder computed by hand in float64 from the weights and the rules of MINICPMV.md."""
    c = model.config
    w = {k: v.detach().double() for k, v in model.llm.state_dict().items()}
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    n = input_ids.shape[1]
    h = w["model.embed_tokens.weight"][input_ids[0]] * c.scale_emb
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    branch_scale = c.scale_depth / math.sqrt(c.num_hidden_layers)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q, k, v = (
            (x @ w[p + f"self_attn.{name}.weight"].T).view(n, heads, head_dim).transpose(0, 1) for name in ("q_proj", "k_proj", "v_proj")
        )
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1) @ v
        h = h + (att.transpose(0, 1).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T) * branch_scale
        x = _rms(h, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
        mlp = (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        h = h + mlp * branch_scale
    h = _rms(h, w["model.norm.weight"], c.rms_norm_eps)
    return (h / (c.hidden_size / c.dim_model_base)) @ w["lm_head.weight"].T


def test_logits_equal_a_float64_reference_forward(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits
    reference = _reference_logits(tiny_model, ids)
    assert logits.shape == (1, ids.shape[1], tiny_model.config.vocab_size)
    torch.testing.assert_close(logits[0].double(), reference, rtol=1e-4, atol=1e-4)


def test_input_embeddings_are_scaled_by_scale_emb(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    assert tiny_model.config.scale_emb == 12
    with torch.no_grad():
        embeds = tiny_model.embed_inputs(ids)
        plain = tiny_model.get_input_embeddings()(ids)
        torch.testing.assert_close(embeds, plain * 12, rtol=0, atol=0)
        # the decoder applies the same scaling when it embeds ids itself
        from_ids = tiny_model(input_ids=ids).logits
        from_embeds = tiny_model(inputs_embeds=plain * 12).logits
    torch.testing.assert_close(from_ids, from_embeds, rtol=0, atol=0)


def test_residual_branches_are_scaled_by_scale_depth_over_sqrt_depth(tiny_model, tiny_tokenizer):
    layer = tiny_model.llm.model.layers[1]
    scale = 1.4 / math.sqrt(tiny_model.config.num_hidden_layers)
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("in", args[0].clone()), with_kwargs=True),
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", out[0].clone())),
        layer.mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("mlp", out.clone())),
        layer.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.clone())),
    ]
    try:
        with torch.no_grad():
            tiny_model(input_ids=_ids(tiny_tokenizer))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(seen["out"], seen["in"] + scale * seen["attn"] + scale * seen["mlp"], rtol=1e-5, atol=1e-5)
    # and the MLP reads the state after the scaled attention branch
    mid = seen["in"] + scale * seen["attn"]
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(mid)), seen["mlp"], rtol=1e-5, atol=1e-5)


def test_layer_with_zero_output_projections_is_the_identity(fresh_model, tiny_tokenizer):
    layers = fresh_model.llm.model.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        ids = _ids(tiny_tokenizer)
        hidden = fresh_model.llm.model(input_ids=ids).last_hidden_state
        # every layer adds nothing: the output is norm(embed * scale_emb)
        expected = fresh_model.llm.model.norm(fresh_model.get_input_embeddings()(ids) * 12)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)


def test_logits_are_lm_head_of_the_normed_state_over_width_ratio(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    c = tiny_model.config
    last_layer_out = {}
    hook = tiny_model.llm.model.layers[-1].register_forward_hook(lambda m, a, out: last_layer_out.__setitem__("h", out))
    try:
        with torch.no_grad():
            hidden = tiny_model.llm.model(input_ids=ids).last_hidden_state
            logits = tiny_model(input_ids=ids).logits
    finally:
        hook.remove()
    # last_hidden_state is the final RMSNorm of the last layer's output
    torch.testing.assert_close(hidden, _rms(last_layer_out["h"], tiny_model.llm.model.norm.weight, c.rms_norm_eps), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        manual = hidden / (c.hidden_size / c.dim_model_base) @ tiny_model.llm.lm_head.weight.T
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


def test_logits_are_float32_in_a_bf16_model(tiny_checkpoint, tiny_tokenizer):
    model = MiniCPMV.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    assert model.llm.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=_ids(tiny_tokenizer)).logits
    assert logits.dtype == torch.float32


def test_bf16_model_runs_with_an_image_and_agrees_with_fp32(tiny_checkpoint, tiny_tokenizer, processor):
    """The official weights are bf16: a model loaded in bf16 must take images (vision, resampler, decoder)."""
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, Image.open(EXAMPLES / "images" / "clock.jpg"))
    logits = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = MiniCPMV.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
        with torch.no_grad():
            logits[dtype] = model(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound).logits
    assert logits[torch.bfloat16].dtype == torch.float32
    assert torch.isfinite(logits[torch.bfloat16]).all()
    scale = logits[torch.float32].abs().max()
    assert (logits[torch.bfloat16] - logits[torch.float32]).abs().max() < 0.05 * scale


def test_rotary_cos_sin_come_from_inv_freq(tiny_model):
    rotary = tiny_model.llm.model.rotary_emb
    head_dim = tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    want_inv = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    np.testing.assert_allclose(rotary.inv_freq.numpy(), want_inv, rtol=1e-6)
    positions = torch.tensor([[0, 1, 5, 100, 4095]])
    cos, sin = rotary(torch.zeros(1, 5, 8), positions)
    angles = np.outer(positions[0].numpy(), want_inv)
    angles = np.concatenate([angles, angles], axis=1)
    assert cos.shape == sin.shape == (1, 5, head_dim)
    np.testing.assert_allclose(cos[0].numpy(), np.cos(angles), atol=2e-4)
    np.testing.assert_allclose(sin[0].numpy(), np.sin(angles), atol=2e-4)
    cos16, _ = rotary(torch.zeros(1, 5, 8, dtype=torch.bfloat16), positions)
    assert cos16.dtype == torch.float32, "handed out in the rotation's dtype"
    assert torch.equal(cos16, cos.to(torch.bfloat16).float()), "rounded to the activation dtype first, as the release does"
    assert not torch.equal(cos16, cos)


# ---------------------------------------------------------------- resampler


def _mae_sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
    """MAE's 2-D table (as MINICPMV.md cites it), written out for a (height, width) grid, float64."""
    out = np.zeros((height * width, dim))
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    for row in range(height):
        for col in range(width):
            i = row * width + col
            # first half encodes the column (MAE meshgrid "w goes first"), second half the row
            out[i, 0:quarter] = np.sin(col * omega)
            out[i, quarter : 2 * quarter] = np.cos(col * omega)
            out[i, 2 * quarter : 3 * quarter] = np.sin(row * omega)
            out[i, 3 * quarter :] = np.cos(row * omega)
    return out


@pytest.mark.parametrize("dim, height, width", [(8, 2, 3), (16, 3, 2), (32, 1, 4), (64, 8, 8)])
def test_sincos_2d_equals_the_mae_formula(dim, height, width):
    table = sincos_2d(dim, height, width)
    assert table.dtype == torch.float32 and table.shape == (height * width, dim)
    np.testing.assert_allclose(table.numpy(), _mae_sincos_2d(dim, height, width), atol=1e-6)


def test_sincos_2d_small_values_by_hand():
    # dim 8, grid 1x2: omega = [1, 1/100]; position 1 is column 1, row 0
    table = sincos_2d(8, 1, 2).numpy()
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    np.testing.assert_allclose(table[1], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1], atol=1e-7)


def test_stored_query_pos_embed_is_the_8x8_table(tiny_model):
    np.testing.assert_allclose(
        tiny_model.resampler.pos_embed.detach().numpy(), _mae_sincos_2d(tiny_model.config.hidden_size, 8, 8), atol=1e-6
    )


def _manual_resampler(r: Resampler, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    e, heads = r.embed_dim, r.attn.num_heads
    d = e // heads
    layer_norm = torch.nn.functional.layer_norm
    kv = layer_norm(x @ r.kv_proj.weight.T, (e,), r.ln_kv.weight, r.ln_kv.bias, 1e-6)
    side = math.isqrt(r.query.shape[0])  # the queries sit on a side x side grid
    q_in = layer_norm(r.query, (e,), r.ln_q.weight, r.ln_q.bias, 1e-6) + torch.from_numpy(_mae_sincos_2d(e, side, side)).float()
    k_in = kv + torch.from_numpy(_mae_sincos_2d(e, *grid)).float()
    wq, wk, wv = r.attn.in_proj_weight.split(e)
    bq, bk, bv = r.attn.in_proj_bias.split(e)
    outs = []
    for n in range(x.shape[0]):
        q = (q_in @ wq.T + bq).view(-1, heads, d).transpose(0, 1)
        k = (k_in[n] @ wk.T + bk).view(-1, heads, d).transpose(0, 1)
        v = (kv[n] @ wv.T + bv).view(-1, heads, d).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        o = att.transpose(0, 1).reshape(-1, e) @ r.attn.out_proj.weight.T + r.attn.out_proj.bias
        outs.append(layer_norm(o, (e,), r.ln_post.weight, r.ln_post.bias, 1e-6) @ r.proj)
    return torch.stack(outs)


def test_a_resampler_built_on_its_own_has_the_sincos_query_table():
    r = Resampler(num_queries=16, embed_dim=64, num_heads=4, kv_dim=24)
    np.testing.assert_allclose(r.pos_embed.detach().numpy(), _mae_sincos_2d(64, 4, 4), atol=1e-6)
    assert not r.pos_embed.requires_grad


def test_resampler_equals_a_manual_multihead_attention():
    torch.manual_seed(0)
    r = Resampler(num_queries=16, embed_dim=64, num_heads=4, kv_dim=24).eval()
    with torch.no_grad():
        for name, p in r.named_parameters():
            if name == "pos_embed":  # as the official checkpoint stores it (see the test above)
                p.copy_(torch.from_numpy(_mae_sincos_2d(64, 4, 4)).float())
            else:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("ln_q.weight") else 0.0))
    x = torch.randn(3, 2 * 5, 24)
    with torch.no_grad():
        out = r(x, (2, 5))
        manual = _manual_resampler(r, x, (2, 5))
    assert out.shape == (3, 16, 64)
    torch.testing.assert_close(out, manual, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the key positions depend on the grid, not only on the number of patches
        assert not torch.allclose(r(x, (5, 2)), out, atol=1e-4)


def test_resampler_of_the_model_equals_the_manual_computation(tiny_model):
    torch.manual_seed(1)
    x = torch.randn(2, 3 * 4, tiny_model.vpm.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model.resampler(x, (3, 4)), _manual_resampler(tiny_model.resampler, x, (3, 4)), rtol=1e-4, atol=1e-4
        )


# ---------------------------------------------------------------- vision tower


def _pixels(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size[1], size[0], generator=g) * 2 - 1


def test_image_features_are_resampled_vision_features_on_the_patch_grid(tiny_model):
    pixels = _pixels((30, 20), 0)  # not a multiple of 14: padded, grid (ceil(20/14), ceil(30/14)) = (2, 3)
    with torch.no_grad():
        features = tiny_model.get_image_features([pixels.unsqueeze(0)])
        vision = tiny_model.vpm.forward_features(pixels.unsqueeze(0))
        assert vision.shape[1] == 2 * 3
        manual = tiny_model.resampler(vision, (2, 3))
    assert features.shape == (1, 64, tiny_model.config.hidden_size)
    torch.testing.assert_close(features, manual, rtol=0, atol=0)


def test_batched_vision_equals_one_image_at_a_time(tiny_model):
    same_size = [_pixels((56, 42), seed) for seed in range(3)]
    with torch.no_grad():
        batched = tiny_model.get_image_features([torch.stack(same_size)])
        single = torch.cat([tiny_model.get_image_features([p.unsqueeze(0)]) for p in same_size])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_grouped_mixed_sizes_come_back_in_the_original_order(tiny_model):
    images = [_pixels(size, i) for i, size in enumerate([(56, 42), (28, 28), (56, 42), (42, 70), (28, 28)])]
    groups, order = group_by_size(images)
    with torch.no_grad():
        grouped = tiny_model.get_image_features(groups, order)
        single = torch.cat([tiny_model.get_image_features([p.unsqueeze(0)]) for p in images])
    torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- image features in the prompt


def test_image_features_land_exactly_in_the_unk_slots(tiny_model, tiny_tokenizer, processor):
    image = Image.open(EXAMPLES / "images" / "fruit_bowl.jpg")  # 640x480: source + 2x1 grid
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, image)
    assert bound.shape == (3, 3)
    with torch.no_grad():
        embeds = tiny_model.embed_inputs(ids, pixels, order, bound)
        features = tiny_model.get_image_features(pixels, order)
        text = tiny_model.get_input_embeddings()(ids) * 12
    image_slot = torch.zeros(ids.shape, dtype=torch.bool)
    for k, (row, start, end) in enumerate(bound.tolist()):
        torch.testing.assert_close(embeds[row, start:end], features[k], rtol=0, atol=0)
        image_slot[row, start:end] = True
    assert torch.equal(image_slot, ids == tiny_tokenizer.unk_token_id)
    torch.testing.assert_close(embeds[~image_slot], text[~image_slot], rtol=0, atol=0)


def test_image_features_go_to_their_batch_row(tiny_model, tiny_tokenizer, processor):
    first, second = Image.open(EXAMPLES / "images" / "clock.jpg"), Image.open(EXAMPLES / "images" / "stop_sign.jpg")
    rows = [_image_inputs(processor, tiny_tokenizer, im) for im in (first, second)]
    ids = torch.cat([r[0] for r in rows])  # same text, unsliced images: same length
    bound = image_bounds(ids, tiny_tokenizer.im_start_id, tiny_tokenizer.im_end_id)
    assert bound[:, 0].tolist() == [0, 1]
    pixels, order = group_by_size(processor.pixel_values(first) + processor.pixel_values(second))
    with torch.no_grad():
        embeds = tiny_model.embed_inputs(ids, pixels, order, bound)
        f_first = tiny_model.get_image_features(*group_by_size(processor.pixel_values(first)))
        f_second = tiny_model.get_image_features(*group_by_size(processor.pixel_values(second)))
    _, start, end = bound[0].tolist()
    torch.testing.assert_close(embeds[0, start:end], f_first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds[1, start:end], f_second[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(f_first, f_second)


def test_forward_with_an_image_uses_the_spliced_embeddings(tiny_model, tiny_tokenizer, processor):
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, Image.open(EXAMPLES / "images" / "clock.jpg"))
    with torch.no_grad():
        with_image = tiny_model(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound).logits
        from_embeds = tiny_model(inputs_embeds=tiny_model.embed_inputs(ids, pixels, order, bound)).logits
        text_only = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(with_image, from_embeds, rtol=0, atol=0)
    assert not torch.allclose(with_image[:, -1], text_only[:, -1], atol=1e-3)


@pytest.mark.parametrize("trained", ["vpm", "resampler"])
def test_an_image_free_training_batch_still_reaches_the_trained_vision_parameters(tiny_checkpoint_fp32, trained):
    """Distributed training reduces every trained parameter's gradient each step. A text-only batch must keep
    the trained vision tower or resampler in the graph (zero gradients), or DDP without unused-parameter
    search and DeepSpeed wait for gradients that never come. Also when only the resampler is trained."""
    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).train()
    model.requires_grad_(False)
    getattr(model, trained).requires_grad_(True)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in getattr(model, trained).named_parameters()}
    assert all(g is not None for g in grads.values()), [name for name, g in grads.items() if g is None]
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())  # in the graph, without effect


def test_mismatch_between_images_and_placeholders_is_an_error(tiny_model, tiny_tokenizer, processor):
    image = Image.open(EXAMPLES / "images" / "fruit_bowl.jpg")
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, image)  # 3 images, 3 placeholders
    with torch.no_grad():
        with pytest.raises(InvalidInputError, match="3 images were given but the prompt has 2 image placeholders"):
            tiny_model.embed_inputs(ids, pixels, order, bound[:2])
        with pytest.raises(InvalidInputError, match="without image_bound"):
            tiny_model.embed_inputs(ids, pixels, order, None)
        short = bound.clone()
        short[0, 2] -= 1
        with pytest.raises(InvalidInputError, match="64 slots"):
            tiny_model.embed_inputs(ids, pixels, order, short)


# ---------------------------------------------------------------- training


def test_forward_with_labels_gives_the_shifted_cross_entropy_and_backward_works(fresh_model, tiny_tokenizer, processor):
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, Image.open(EXAMPLES / "images" / "fruit_bowl.jpg"))
    labels = torch.full_like(ids, -100)
    labels[0, -6:] = ids[0, -6:]
    inputs = dict(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound)
    with torch.no_grad():
        logits = fresh_model(**inputs).logits
        eval_loss = fresh_model(**inputs, labels=labels).loss
    # label i is the token that position i-1 predicts (transformers' causal-LM convention)
    manual = torch.nn.functional.cross_entropy(logits[0, :-1].double(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(eval_loss.double(), manual, rtol=1e-5, atol=1e-5)
    fresh_model.train()
    loss = fresh_model(**inputs, labels=labels).loss
    assert loss is not None and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), manual, rtol=1e-5, atol=1e-5)
    loss.backward()
    for name in (
        "llm.model.embed_tokens.weight",
        "llm.model.layers.0.self_attn.q_proj.weight",
        "llm.lm_head.weight",
        "resampler.query",
        "resampler.kv_proj.weight",
        "vpm.patch_embed.proj.weight",
        "vpm.blocks.0.attn.qkv.weight",
    ):
        grad = fresh_model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_a_training_forward_builds_no_key_value_cache(fresh_model, tiny_tokenizer, processor):
    # A cache costs memory in every training step, and compiled decoder layers would specialise on it.
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, Image.open(EXAMPLES / "images" / "clock.jpg"))
    inputs = dict(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound)
    fresh_model.train()
    assert fresh_model.config.use_cache and fresh_model(**inputs, labels=ids).past_key_values is None
    fresh_model.eval()
    with torch.no_grad():
        assert fresh_model(**inputs).past_key_values.get_seq_length() == ids.shape[1]


def test_gradient_checkpointing_toggles_decoder_and_timm_tower(fresh_model, tiny_tokenizer, processor):
    model = fresh_model
    assert not model.vpm.grad_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert model.vpm.grad_checkpointing is True
    assert all(layer.gradient_checkpointing for layer in model.llm.model.layers)
    # training still works and gives the gradients of the plain graph
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, Image.open(EXAMPLES / "images" / "clock.jpg"))
    labels = ids.clone()
    model.train()
    model(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound, labels=labels).loss.backward()
    with_checkpointing = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_disable()
    assert model.vpm.grad_checkpointing is False
    assert not any(layer.gradient_checkpointing for layer in model.llm.model.layers)
    model(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound, labels=labels).loss.backward()
    assert "vpm.blocks.0.attn.qkv.weight" in with_checkpointing
    for name, grad in with_checkpointing.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- attention backends


def test_eager_and_sdpa_give_the_same_logits(tiny_checkpoint_fp32, tiny_tokenizer, processor):
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, Image.open(EXAMPLES / "images" / "fruit_bowl.jpg"))
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_generate_without_attention_mask_still_sees_the_image(tiny_model, processor, tiny_tokenizer):
    """The pad id (0) is also the image-slot token: generate() must not mask the slots out."""
    image = Image.open(EXAMPLES / "images" / "clock.jpg")
    ids, pixels, order, bound = _image_inputs(processor, tiny_tokenizer, image)
    kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=8, pad_token_id=0)
    with torch.inference_mode():
        with_image = tiny_model.generate(input_ids=ids, pixel_values=pixels, vision_order=order, image_bound=bound, **kwargs)
        masked = tiny_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, vision_order=order, image_bound=bound, **kwargs
        )
        without_image = tiny_model.generate(input_ids=ids, **kwargs)
    assert torch.equal(with_image, masked)
    assert not torch.equal(with_image, without_image)


def test_beam_search_from_input_ids_keeps_each_rows_pictures(tiny_model, processor):
    """generate(input_ids=..., pixel_values=...) with beams copies every row; `image_bound` names rows by index, so
    the pictures must go into the embeddings before the copies are made, or a row's beams see another row's picture."""
    pictures = [Image.open(EXAMPLES / "images" / name).convert("RGB").resize((448, 448)) for name in ("clock.jpg", "stop_sign.jpg")]
    conversation = [{"role": "user", "content": "Describe it."}]
    keys = ("input_ids", "attention_mask", "pixel_values", "vision_order", "image_bound")
    settings = dict(do_sample=False, num_beams=3, max_new_tokens=6, pad_token_id=0)

    def generate(batch):
        return tiny_model.generate(**{key: batch[key] for key in keys}, **settings)

    with torch.inference_mode():
        together = generate(processor([conversation] * 2, [[p] for p in pictures], padding_side="left"))
        alone = [generate(processor([conversation], [[p]]))[0] for p in pictures]
    assert not torch.equal(alone[0], alone[1])  # else this test could not tell the rows apart
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
