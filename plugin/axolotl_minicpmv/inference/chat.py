"""`MiniCPMV.chat`: the official chat contract (one conversation, one optional picture, the official generation
defaults) on top of the processor and `generate`, with the fast path of `fast_decoding` / `fast_vision`.

Answers must equal the official implementation's for the same inputs; tests/test_chat.py pins them.
"""

from __future__ import annotations

import functools
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.utils import logging

from ..model.conversation import validate_conversation
from ..model.image_processing_minicpmv import MiniCPMVImageProcessor, load_image
from ..model.processing_minicpmv import MiniCPMVProcessor, tag_images
from ..model.transfer import to_device
from .fast_decoding import FastDecoder, Sampling
from .fast_vision import image_encoder

logger = logging.get_logger(__name__)

# The official chat's generation settings: sampling (True) or beam search (False). Callers override only these keys.
GENERATION_DEFAULTS = {
    True: {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True, "repetition_penalty": 1.05},
    False: {"num_beams": 3, "repetition_penalty": 1.2},
}


def generation_config_for(sampling: bool, overrides: dict) -> dict:
    """The official defaults for `sampling`, with the caller's values for those keys (others are warned about)."""
    config = dict(GENERATION_DEFAULTS[bool(sampling)])
    ignored = sorted(overrides.keys() - config.keys())
    if ignored:
        logger.warning(f"chat(): ignoring {ignored}; with sampling={sampling} only {sorted(config)} can be overridden")
    config.update({k: overrides[k] for k in config.keys() & overrides.keys()})
    return config


@torch.inference_mode()
def chat(
    model,
    image,
    msgs,
    context=None,
    tokenizer=None,
    max_new_tokens: int = 1024,
    sampling: bool = True,
    max_inp_length: int = 2048,
    fast: bool | None = None,
    processor: MiniCPMVProcessor | None = None,
    **kwargs,
):
    """Answer the last user turn of `msgs` (list or JSON string) about `image` (PIL, path, base64 or None).

    `context` is accepted for the official signature and ignored, as the official 2.0 code ignores it: the
    conversation is `msgs`. A leading system turn is put in front of the first user turn's text.
    Decoding: by default on a GPU through `FastDecoder(compile=False)`, the eager decoder step recorded as a
    CUDA graph (nothing compiled: the first request answers within seconds, several times `generate`'s speed);
    elsewhere through `generate`. `fast=True` uses the fastest path: the prefill, the decoding step and the
    vision tower's blocks compiled (the first call compiles them, minutes; see benchmarks/RESULTS.md);
    `fast=False` always `generate`, as the official code. Every path gives `generate`'s tokens in float32
    (sampled, greedy, or beam search).
    Returns `(answer, msgs + [assistant answer], generation_config)`; `msgs` is not modified.
    """
    if tokenizer is None and processor is None:
        raise ValueError("chat() needs the tokenizer: pass tokenizer=load_tokenizer(model_dir)")
    processor = processor or _processor_for(model, tokenizer)
    tokenizer = processor.tokenizer
    image = None if image is None else load_image(image)
    images = [] if image is None else [image]
    turns = tag_images(validate_conversation(msgs), len(images))
    layouts = [processor.layout(image)] if image is not None else []
    prompt_ids = processor.encode_prompt(processor.prompt_text(turns, layouts), max_inp_length).unsqueeze(0)
    input_ids = to_device(prompt_ids, model.device)
    decoder = None  # generate
    if fast:
        init_fast_path(model)
        decoder = model._fast_decoder
    elif fast is None and model.device.type == "cuda":
        decoder = recorded_decoder(model)
    if image is None:
        inputs_embeds = model.embed_text(input_ids)
    else:
        encode = model._fast_encode_images if fast else model.encode_images
        features = image_features(model, image, processor, encode, layouts[0])
        bound = processor._row_bounds(prompt_ids[0], 0, len(features))  # on the host: no GPU wait
        inputs_embeds = model.place_image_features(input_ids, features, bound)

    generation_config = generation_config_for(sampling, kwargs)
    if decoder is not None:
        output = fast_generate(decoder, inputs_embeds, generation_config, tokenizer, max_new_tokens)
    else:
        with warnings.catch_warnings():
            # Like the official chat, the repetition penalty sees only generated tokens; that is intended.
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            output = model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.ones(input_ids.shape, dtype=torch.long, device=model.device),
                pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                max_new_tokens=max_new_tokens,
                **generation_config,
            )
    answer = decode_answer(output[0], tokenizer)
    history = json.loads(msgs) if isinstance(msgs, str) else [dict(m) for m in msgs]
    return answer, history + [{"role": "assistant", "content": answer}], generation_config


def _processor_for(model, tokenizer) -> MiniCPMVProcessor:
    """The processor for `tokenizer` and the config's slicing keys as they are now (the official chat reads the
    config at every call), kept on the model (a plain attribute, never saved) while neither changes."""
    image_processor = MiniCPMVImageProcessor.from_model_config(model.config)
    kept = getattr(model, "_chat_processor", None)
    if kept is None or kept.tokenizer is not tokenizer or kept.image_processor.to_dict() != image_processor.to_dict():
        kept = MiniCPMVProcessor(image_processor, tokenizer)
        model._chat_processor = kept
    return kept


def image_features(model, image, processor: MiniCPMVProcessor, encode, layout=None) -> torch.Tensor:
    """Features of the source image then the cells, as `get_image_features` gives them, with the source's
    bicubic resize (PIL releases the GIL) running in a thread while the cells go through the tower."""
    layout = layout or processor.layout(image)
    to_pixels = processor.image_processor.to_pixel_values
    with ThreadPoolExecutor(max_workers=1) as pool:
        source = pool.submit(processor.source_image, image, layout)
        cells = processor.cell_images(image, layout)
        cell_features = [encode(torch.stack([to_pixels(cell, model.device) for cell in cells]))] if cells else []
        source_features = encode(to_pixels(source.result(), model.device)[None])
    return torch.cat([source_features, *cell_features])


def decode_answer(ids: torch.Tensor, tokenizer) -> str:
    """Drop pad/unk ids (0), one leading bos and one trailing eos; decode the rest as text."""
    ids = [i for i in ids.tolist() if i != 0]  # one read from the GPU
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids).strip()


def weights_key(model) -> tuple:
    """What the fast paths' CUDA graphs and compiled steps depend on: the device, the dtype and the memory of
    every weight. It changes when the model moved, or when a module or weight was replaced (an adapter merged
    and unloaded, a layer swapped); in-place updates of the same tensors keep it (see FastDecoder on those)."""
    return model.device, model.dtype, tuple(p.data_ptr() for p in model.parameters())


def init_fast_path(model) -> None:
    """`FastDecoder` and an image encoder whose tower blocks are compiled and replayed from CUDA graphs on a
    GPU (`fast_vision`). Plain attributes, not submodules: never saved. Rebuilt when `weights_key` changed:
    graphs and compiled steps point at the old weights."""
    if getattr(model, "_fast_path_for", None) != weights_key(model):
        on_gpu = model.device.type == "cuda"
        if on_gpu:
            logger.warning(
                "fast path (FastDecoder): the first request compiles the prefill and the decoding step (once per process, minutes)"
            )
        # A batch's step reads only the cache blocks each of its rows attends to (decode_mask; +6 % tokens/s at
        # batch 8 on an H100, benchmarks/RESULTS.md 2026-12-07). Not on the CPU, whose eager loop would run flex
        # attention's unfused reference implementation.
        model._fast_decoder = FastDecoder(model, block_sparse=on_gpu)
        model._fast_encode_images = image_encoder(model, compile_blocks=on_gpu, cuda_graphs=on_gpu)
        # Batches of several conversations (predict, serving) bring stacks of ever new sizes, each of which a
        # graph would record anew (three forwards); their large stacks are bound by the GPU's arithmetic, not by launches.
        model._fast_encode_stacks = functools.partial(model._fast_encode_images, graphs=False)
        model._fast_path_for = weights_key(model)  # after FastDecoder stacked the projections


def recorded_decoder(model) -> FastDecoder:
    """`chat()`'s default decoder on a GPU: `FastDecoder(compile=False)`, whose decoding step is the eager one
    recorded as a CUDA graph. Kept on the model like `init_fast_path`'s, rebuilt when `weights_key` changed."""
    kept = getattr(model, "_recorded_decoder", None)
    if kept is None or kept[0] != weights_key(model):
        decoder = FastDecoder(model, compile=False)
        kept = model._recorded_decoder = (weights_key(model), decoder)  # after the decoder stacked the projections
    return kept[1]


def fast_generate(
    decoder: FastDecoder,
    inputs_embeds,
    generation_config: dict,
    tokenizer,
    max_new_tokens: int,
    attention_mask=None,
    min_new_tokens: int = 0,
    on_tokens=None,
) -> torch.Tensor:
    """`generate`'s new tokens for `generation_config` (greedy, sampled or beam search), through `decoder` (the
    model's compiled one from `init_fast_path`, or `recorded_decoder`). Streaming (`on_tokens`) is greedy or sampled."""
    num_beams = generation_config.get("num_beams", 1)
    if num_beams > 1:
        if on_tokens is not None:
            raise ValueError("streaming (on_tokens) needs num_beams=1")
        return decoder.beam_search(
            inputs_embeds,
            max_new_tokens,
            num_beams,
            eos_token_id=tokenizer.eos_token_id,
            min_new_tokens=min_new_tokens,
            repetition_penalty=generation_config.get("repetition_penalty", 1.0),
            attention_mask=attention_mask,
        )
    fields = Sampling.__dataclass_fields__.keys()
    sampling = Sampling(**{k: v for k, v in generation_config.items() if k in fields})
    return decoder.generate(
        inputs_embeds,
        max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        min_new_tokens=min_new_tokens,
        sampling=sampling,
        attention_mask=attention_mask,
        on_tokens=on_tokens,
    )
