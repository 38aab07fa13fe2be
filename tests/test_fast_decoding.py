"""FastDecoder: the static-cache decoding loop (eager on CPU; compiled with CUDA graphs on a GPU, checked there
by benchmarks/gpu_checks/check_fast_decode.py) emits generate()'s greedy tokens and samples generate()'s distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES
from PIL import Image
from transformers.cache_utils import StaticCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from axolotl_minicpmv.inference import fast_decoding
from axolotl_minicpmv.inference.fast_decoding import FastDecoder, Sampling, _prefill_forward, choose_tokens, compiled_prefill
from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor, group_by_size, image_bounds

MSGS = [{"role": "user", "content": "What is in the image?"}]


@pytest.fixture(scope="module")
def prompt(tiny_model, tiny_tokenizer):
    """Embeddings of a one-image chat prompt, repeated for a batch of 2."""
    image = Image.open(EXAMPLES / "images" / "clock.jpg").convert("RGB")
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    ids = processor.encode_prompt(processor.chat_prompt(MSGS, image)).unsqueeze(0).repeat(2, 1)
    pixels, order = group_by_size(processor.pixel_values(image) * 2)
    bound = image_bounds(ids, tiny_tokenizer.im_start_id, tiny_tokenizer.im_end_id)
    with torch.inference_mode():
        return tiny_model.embed_inputs(ids, pixels, order, bound)


def _generate(model, embeds, num_beams: int = 1, **kwargs):
    with torch.inference_mode():
        return model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            do_sample=False,
            num_beams=num_beams,
            pad_token_id=0,
            **kwargs,
        )


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.2])
def test_greedy_tokens_equal_generate(tiny_model, prompt, repetition_penalty):
    decoder = FastDecoder(tiny_model)
    ours = decoder.generate(prompt, 24, sampling=Sampling(repetition_penalty=repetition_penalty))
    theirs = _generate(tiny_model, prompt, max_new_tokens=24, min_new_tokens=24, eos_token_id=None, repetition_penalty=repetition_penalty)
    assert ours.shape == (2, 24)
    assert torch.equal(ours, theirs)
    # A second request reuses the cache (reset in between) and gives the same tokens.
    assert torch.equal(decoder.generate(prompt, 24, sampling=Sampling(repetition_penalty=repetition_penalty)), ours)


def test_a_shorter_request_reuses_the_longer_cache(tiny_model, prompt):
    decoder = FastDecoder(tiny_model)
    decoder.generate(prompt, 300)  # prompt + 300 tokens: a 512-position cache
    cache = decoder._slot(2).cache
    assert cache.get_max_length() == 512
    ours = decoder.generate(prompt, 12)
    assert decoder._slot(2).cache is cache
    assert torch.equal(ours, _generate(tiny_model, prompt, max_new_tokens=12, min_new_tokens=12, eos_token_id=None))
    decoder.generate(torch.cat([prompt, prompt]), 12)  # a larger batch grows the cache, keeping its length
    grown = decoder._slot(2).cache
    assert grown is not cache and grown.get_max_length() == 512 and decoder._slot(2).key == (4, 512)
    # A smaller batch runs in the kept cache (filled up with copies of its last row), with its own tokens.
    assert torch.equal(decoder.generate(torch.cat([prompt, prompt[:1]]), 12), torch.cat([ours, ours[:1]]))
    assert decoder._slot(3).cache is grown
    # A single prompt has a cache of its own, sized for itself: no fillers to prefill and decode.
    assert torch.equal(decoder.generate(prompt[:1], 12), ours[:1])
    assert decoder._slot(1).key == (1, 256) and decoder._slot(2).cache is grown


def test_the_eager_step_reads_only_the_cache_window_that_holds_its_position(tiny_model, prompt, monkeypatch):
    """The recorded eager step (chat()'s default on a GPU) reads its cache in windows that double from
    FIRST_WINDOW: its tokens (greedy and beam search) are generate's across a window's edge, and nothing past the
    current window is read (NaN written there after the first step changes no token; read by a step over the whole
    cache, it does)."""
    single = prompt[:1]
    block = fast_decoding.PREFILL_BLOCK
    start = -(-single.shape[1] // block) * block  # a lone prompt is left-padded to whole blocks
    new = 320 - start  # positions up to 319: the windows of 256 and 512 positions
    assert 256 - start > 0
    reference = _generate(tiny_model, single, max_new_tokens=new, min_new_tokens=new, eos_token_id=None)

    def answer(first_window: int) -> torch.Tensor:
        monkeypatch.setattr(fast_decoding, "FIRST_WINDOW", first_window)
        decoder = FastDecoder(tiny_model, compile=False)
        decoder.reserve(1, 1024)

        def poison(tokens):
            for layer in decoder._slot(1).cache.layers:
                layer.keys[:, :, 512:] = float("nan")
                layer.values[:, :, 512:] = float("nan")
            return []

        tokens = decoder.generate(single, new, on_tokens=poison)
        assert next(iter(decoder._slot(1).loops.values())).windows == fast_decoding.cache_windows(1024)
        return tokens

    assert fast_decoding.cache_windows(512) == (512,)  # chat's usual answer: one window
    assert torch.equal(answer(first_window=16), reference)
    assert fast_decoding.cache_windows(512) == (16, 32, 64, 128, 256, 512)
    # Beam search (chat's sampling=False) reorders only the window's positions of its cache rows: generate's beams.
    beams = FastDecoder(tiny_model, compile=False).beam_search(single, new, 3, repetition_penalty=1.2)
    reference_beams = _generate(tiny_model, single, num_beams=3, max_new_tokens=new, eos_token_id=None, repetition_penalty=1.2)
    assert torch.equal(beams, reference_beams)
    assert not torch.equal(answer(first_window=1024), reference)


def test_a_reserved_cache_serves_every_request_up_to_its_size(tiny_model, prompt):
    """`reserve` sizes a slot's cache ahead (a server's context, a prediction run's longest prompt): requests up to
    that size reuse it with their own tokens, and it never shrinks."""
    decoder = FastDecoder(tiny_model)
    decoder.reserve(2, 1000)
    decoder.reserve(1, 300)
    cache = decoder._slot(2).cache
    assert decoder._slot(2).key == (2, 1024) and decoder._slot(1).key == (1, 512)
    ours = decoder.generate(prompt, 12)
    assert decoder._slot(2).cache is cache
    assert torch.equal(ours, _generate(tiny_model, prompt, max_new_tokens=12, min_new_tokens=12, eos_token_id=None))
    assert torch.equal(decoder.generate(prompt[:1], 12), ours[:1]) and decoder._slot(1).key == (1, 512)
    decoder.reserve(2, 100)
    assert decoder._slot(2).cache is cache


def test_a_cache_that_does_not_fit_leaves_the_decoder_usable(tiny_model, prompt, monkeypatch):
    decoder = FastDecoder(tiny_model)
    before = decoder.generate(prompt, 12)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated: no GPU here)")

    with monkeypatch.context() as patch:
        patch.setattr(StaticCache, "early_initialization", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            decoder.generate(prompt, 600)  # a longer request grows the cache: the allocation fails
    assert decoder._slot(2).cache is None and decoder._slot(2).key is None
    assert torch.equal(decoder.generate(prompt, 12), before)  # sized for itself again
    assert decoder._slot(2).key == (2, 256)


def test_many_sampling_settings_keep_a_bounded_number_of_loops(tiny_model, prompt):
    # a server's clients choose their own settings; each loop holds buffers (and on a GPU a graph)
    decoder = FastDecoder(tiny_model, max_loops=3)
    greedy = decoder.generate(prompt, 6)
    for penalty in (1.1, 1.2, 1.3, 1.4, 1.5):
        decoder.generate(prompt, 6, sampling=Sampling(repetition_penalty=penalty))
    loops = decoder._slot(2).loops
    assert len(loops) == 3
    assert [key[0].repetition_penalty for key in loops] == [1.3, 1.4, 1.5]
    assert torch.equal(decoder.generate(prompt, 6), greedy)  # a dropped loop is made again


def test_streaming_hands_over_each_step_and_ends_the_rows_it_is_told(tiny_model, prompt):
    decoder = FastDecoder(tiny_model)
    full = decoder.generate(prompt, 12, sampling=Sampling(repetition_penalty=1.2))
    seen = []

    def on_tokens(tokens):
        seen.append(tokens)
        return [1] if len(seen) == 4 else []  # end row 1 at its fourth token

    streamed = decoder.generate(prompt, 12, sampling=Sampling(repetition_penalty=1.2), on_tokens=on_tokens)
    assert [step[0] for step in seen] == full[0].tolist()
    assert [step[1] for step in seen] == full[1, :4].tolist() + [0] * 8  # pad once ended
    assert streamed[0].tolist() == full[0].tolist()
    assert streamed[1].tolist() == full[1, :4].tolist() + [0] * 8
    # Rows that all end stop the decoding there.
    seen.clear()
    assert decoder.generate(prompt, 12, on_tokens=lambda tokens: seen.append(tokens) or [0, 1]).shape == (2, 12)
    assert len(seen) == 1


def test_streamed_answers_are_the_same_fast_and_plain(tiny_model, tiny_tokenizer):
    from axolotl_minicpmv.inference.generate import generate_answers

    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    conversations = [[{"role": "user", "content": q}] for q in ("What is 17 times 3?", "Name a colour.", "Hello?")]
    streams = {}
    for fast in (True, False):
        seen = []

        def on_tokens(tokens, seen=seen):
            seen.append(tokens)
            return [2] if len(seen) >= 3 else []  # row 2 ends at its third token

        answers = generate_answers(
            tiny_model, processor, conversations, None, fast=fast, max_new_tokens=8, num_beams=1, on_tokens=on_tokens
        )
        streams[fast] = (answers, seen)
    assert streams[True] == streams[False]
    answers, seen = streams[True]
    assert len(answers[2].token_ids) == 3 and [step[2] for step in seen[3:]] == [0] * (len(seen) - 3)
    assert [step[0] for step in seen] == answers[0].token_ids
    with pytest.raises(ValueError, match="num_beams=1"):
        generate_answers(tiny_model, processor, conversations[:1], None, fast=False, max_new_tokens=2, on_tokens=lambda t: [])


def test_left_padded_prompts_give_generates_tokens(tiny_model, prompt):
    # Two rows of different lengths: row 1 is row 0 without its first 5 positions, left-padded to row 0's length.
    embeds = prompt.clone()
    embeds[1, :5] = 0
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    mask[1, :5] = 0
    for penalty in (1.0, 1.2):
        sampling = Sampling(repetition_penalty=penalty)
        ours = FastDecoder(tiny_model).generate(embeds, 16, attention_mask=mask, sampling=sampling)
        with torch.inference_mode():
            theirs = tiny_model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                pad_token_id=0,
                max_new_tokens=16,
                min_new_tokens=16,
                eos_token_id=None,
                repetition_penalty=penalty,
            )
        alone = FastDecoder(tiny_model).generate(prompt[1:, 5:], 16, sampling=sampling)
        assert torch.equal(ours, theirs)
        assert torch.equal(ours[1:], alone)
        assert not torch.equal(ours[0], ours[1])  # the padding changed row 1's prompt, and so its answer


def test_batched_answers_are_the_same_fast_and_plain(tiny_model, tiny_tokenizer):
    """generate_answers through FastDecoder (as on a GPU) and through generate: mixed image sizes, a
    text-only row and a two-image row in one left-padded batch, greedy and with min_new_tokens."""
    from axolotl_minicpmv.inference.generate import generate_answers

    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    images = EXAMPLES / "images"
    rows = [
        ([{"role": "user", "content": "What is this?"}], [Image.open(images / "stop_sign.jpg")]),
        ([{"role": "user", "content": "What is 17 times 3?"}], []),
        ([{"role": "user", "content": "Read it: <image>"}], [Image.open(images / "handwritten_note.jpg")]),
        (
            [{"role": "user", "content": "<image> and <image>: which is round?"}],
            [Image.open(images / "clock.jpg"), Image.open(images / "stop_sign.jpg")],
        ),
    ]
    conversations, pictures = [c for c, _ in rows], [p for _, p in rows]
    for extra in ({}, {"min_new_tokens": 6}):
        kwargs = {"max_new_tokens": 10, "num_beams": 1, **extra}
        fast = generate_answers(tiny_model, processor, conversations, pictures, fast=True, **kwargs)
        plain = generate_answers(tiny_model, processor, conversations, pictures, fast=False, **kwargs)
        assert fast == plain
        assert len({g.text for g in fast}) > 1
    # beam search (the official default for sampling=False: 3 beams, repetition penalty 1.2), left-padded rows
    fast = generate_answers(tiny_model, processor, conversations, pictures, fast=True, max_new_tokens=10)
    assert fast == generate_answers(tiny_model, processor, conversations, pictures, fast=False, max_new_tokens=10)


@pytest.mark.parametrize("sync_every", [1, 4, 64])
def test_stops_after_eos_like_generate(tiny_model, prompt, sync_every):
    free = FastDecoder(tiny_model).generate(prompt[:1], 20)[0].tolist()
    eos = free[5]  # make the sixth greedy token the end of sequence: generation stops right after it
    stop = free.index(eos)
    ours = FastDecoder(tiny_model, sync_every=sync_every).generate(prompt[:1], 20, eos_token_id=eos)
    theirs = _generate(tiny_model, prompt[:1], max_new_tokens=20, eos_token_id=eos)
    assert ours[0].tolist() == free[: stop + 1]
    assert torch.equal(ours, theirs)


def test_min_new_tokens_holds_eos_back(tiny_model, prompt):
    free = FastDecoder(tiny_model).generate(prompt[:1], 20)[0].tolist()
    eos = free[0]
    decoder = FastDecoder(tiny_model)
    for min_new_tokens in (4, 0, 7):  # one loop (one graph on a GPU) serves them all: the minimum is a device value
        ours = decoder.generate(prompt[:1], 12, eos_token_id=eos, min_new_tokens=min_new_tokens)
        theirs = _generate(tiny_model, prompt[:1], max_new_tokens=12, eos_token_id=eos, min_new_tokens=min_new_tokens)
        assert eos not in ours[0, :min_new_tokens].tolist()
        assert torch.equal(ours, theirs)
    assert len(decoder._slot(1).loops) == 1


def test_a_finished_row_is_padded_while_the_other_runs(tiny_model, prompt):
    # Row 0 and row 1 differ by their prompt's last token, so their answers differ.
    embeds = prompt.clone()
    embeds[1, -1] = embeds[1, -2]
    free = FastDecoder(tiny_model).generate(embeds, 16)
    first_differs = next(i for i in range(16) if free[0, i] != free[1, i])
    eos = int(free[0, first_differs])
    assert eos not in free[1, : first_differs + 1].tolist()
    ours = FastDecoder(tiny_model).generate(embeds, 16, eos_token_id=eos, pad_token_id=0)
    theirs = _generate(tiny_model, embeds, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(ours, theirs)
    assert ours[0, first_differs + 1 :].eq(0).all()


def test_chat_fast_gives_the_greedy_answer(tiny_model, tiny_tokenizer):
    image = Image.open(EXAMPLES / "images" / "clock.jpg").convert("RGB")
    kwargs = {"tokenizer": tiny_tokenizer, "sampling": False, "num_beams": 1, "max_new_tokens": 12}
    fast, context, config = tiny_model.chat(image, MSGS, fast=True, **kwargs)
    plain, _, _ = tiny_model.chat(image, MSGS, **kwargs)
    assert fast == plain and fast
    assert context[-1] == {"role": "assistant", "content": fast}
    assert config == {"num_beams": 1, "repetition_penalty": 1.2}


def test_chat_fast_beam_search_is_the_official_default_answer(tiny_model, tiny_tokenizer):
    image = Image.open(EXAMPLES / "images" / "clock.jpg").convert("RGB")
    plain = tiny_model.chat(image, MSGS, tokenizer=tiny_tokenizer, sampling=False, max_new_tokens=12)
    assert tiny_model.chat(image, MSGS, tokenizer=tiny_tokenizer, sampling=False, fast=True, max_new_tokens=12) == plain


def test_chat_fast_samples_with_the_official_defaults(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    answer, _, config = tiny_model.chat(None, MSGS, tokenizer=tiny_tokenizer, fast=True, max_new_tokens=8)
    assert config["do_sample"] and config["top_k"] == 100
    assert isinstance(answer, str)


def test_chat_decodes_through_generate_by_default_off_a_gpu(tiny_checkpoint_fp32, tiny_tokenizer):
    """The default (fast=None) is the recorded eager step on a GPU only: on a CPU it is generate, as fast=False."""
    from axolotl_minicpmv import MiniCPMV

    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
    image = Image.open(EXAMPLES / "images" / "clock.jpg").convert("RGB")
    kwargs = {"tokenizer": tiny_tokenizer, "sampling": False, "max_new_tokens": 10}
    assert model.chat(image, MSGS, **kwargs) == model.chat(image, MSGS, fast=False, **kwargs)
    assert not hasattr(model, "_recorded_decoder") and not hasattr(model, "_fast_decoder")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default's recorded step is a CUDA graph (run on the device machine)")
def test_chat_by_default_on_a_gpu_decodes_generates_tokens_through_the_recorded_step(tiny_checkpoint_fp32, tiny_tokenizer):
    """No flag on a GPU: FastDecoder(compile=False) replays the recorded eager step; greedy and beam answers are
    generate's (float32), and nothing is compiled."""
    from axolotl_minicpmv import MiniCPMV

    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).cuda().eval()
    image = Image.open(EXAMPLES / "images" / "clock.jpg").convert("RGB")
    for sampling in ({"sampling": False, "num_beams": 1}, {"sampling": False}):
        kwargs = {"tokenizer": tiny_tokenizer, "max_new_tokens": 24, **sampling}
        assert model.chat(image, MSGS, **kwargs) == model.chat(image, MSGS, fast=False, **kwargs)
    decoder = model._recorded_decoder[1]
    assert not decoder.compiled and not hasattr(model, "_fast_decoder")
    assert all(loop.graphs for loop in decoder._single.loops.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
def test_sampling_inside_a_cuda_graph_draws_from_generates_distribution():
    """The token choice as FastDecoder captures it: every replay draws anew (the graph advances the RNG's
    offset), from the warpers' distribution, and a seed set before the replays repeats them."""
    from axolotl_minicpmv.inference.cuda_graphs import record_cuda_graph

    sampling = Sampling(do_sample=True, temperature=1.3, top_k=5)  # five tokens of similar chances
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2
    expected = _reference_probs(logits, sampling)[0].cuda()
    draws = 20000
    static = logits.cuda().expand(draws, -1).contiguous()
    graph, tokens = record_cuda_graph(lambda: choose_tokens(static, None, sampling), warmup_runs=2)
    torch.manual_seed(1)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(tokens.clone())
    assert not torch.equal(replays[0], replays[1])
    torch.manual_seed(1)
    graph.replay()
    assert torch.equal(tokens, replays[0])
    for drawn in replays:
        observed = torch.bincount(drawn, minlength=50).double() / draws
        tolerance = 4.5 * (expected * (1 - expected) / draws).sqrt() + 1e-9
        assert ((observed - expected).abs() <= tolerance).all(), (observed - expected).abs().max()


def _reference_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """generate()'s own warpers, in its order."""
    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits.clone())
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(do_sample=True, temperature=0.7, top_k=100, top_p=0.8),
        Sampling(do_sample=True, temperature=1.3, top_k=5),
        Sampling(do_sample=True, top_p=0.5),
        Sampling(do_sample=True),
    ],
)
def test_sampling_draws_from_generates_distribution(sampling):
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2
    expected = _reference_probs(logits, sampling)[0]
    draws = 20000
    generator = torch.Generator().manual_seed(1)
    tokens = choose_tokens(logits.expand(draws, -1), None, sampling, generator)
    observed = torch.bincount(tokens, minlength=50).double() / draws
    assert set(observed.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    # each probability within 4.5 standard errors of a binomial estimate
    tolerance = 4.5 * (expected * (1 - expected) / draws).sqrt() + 1e-9
    assert ((observed - expected).abs() <= tolerance).all(), (observed - expected).abs().max()


def test_top_k_one_and_greedy_pick_the_argmax():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(2))
    assert torch.equal(choose_tokens(logits, None, Sampling()), logits.argmax(-1))
    assert torch.equal(choose_tokens(logits, None, Sampling(do_sample=True, top_k=1)), logits.argmax(-1))


def test_repetition_penalty_applies_to_seen_tokens_only():
    logits = torch.tensor([[2.0, 1.9, -0.5, -0.6]])
    seen = torch.tensor([[True, False, True, False]])
    # 2.0 / 1.2 < 1.9, so the unseen token wins; a negative seen logit is pushed further down
    assert choose_tokens(logits, seen, Sampling(repetition_penalty=1.2)).item() == 1
    assert choose_tokens(-logits, seen, Sampling(repetition_penalty=1.2)).item() == 3


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"repetition_penalty": 0}])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError, match="invalid sampling"):
        Sampling(**bad)


def test_fast_chat_works_after_the_model_changes_dtype(tiny_checkpoint_fp32, tiny_tokenizer):
    from axolotl_minicpmv import MiniCPMV

    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
    kwargs = {"tokenizer": tiny_tokenizer, "sampling": False, "num_beams": 1, "max_new_tokens": 6, "fast": True}
    model.chat(None, MSGS, **kwargs)
    decoder = model._fast_decoder
    model.chat(None, MSGS, **kwargs)
    assert model._fast_decoder is decoder  # kept between requests
    model.to(torch.bfloat16)
    # The kept decoder's float32 cache cannot take bfloat16 keys: the fast path must be rebuilt.
    answer, _, _ = model.chat(None, MSGS, **kwargs)
    assert model._fast_decoder is not decoder and model._fast_decoder._slot(1).cache.layers[0].keys.dtype == torch.bfloat16
    assert isinstance(answer, str)


def test_the_fast_path_is_rebuilt_when_a_layer_is_replaced(tiny_checkpoint_fp32, tiny_tokenizer):
    """A replaced module (as an adapter's merge_and_unload leaves) has weights that the kept decoder's graphs never
    saw: the next request builds a new fast path, which answers as generate does with the new layer."""
    from axolotl_minicpmv import MiniCPMV

    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
    greedy = {"tokenizer": tiny_tokenizer, "sampling": False, "num_beams": 1, "max_new_tokens": 8}
    before = model.chat(None, MSGS, fast=True, **greedy)[0]
    decoder = model._fast_decoder
    mlp = model.llm.model.layers[0].mlp
    mlp.down_proj = torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    with torch.no_grad():
        mlp.down_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    after = model.chat(None, MSGS, fast=True, **greedy)[0]
    assert model._fast_decoder is not decoder
    assert after == model.chat(None, MSGS, fast=False, **greedy)[0] != before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled step and its CUDA graph need a GPU (run on the device machine)")
def test_streaming_on_a_gpu_gives_the_unstreamed_tokens(tiny_model, prompt):
    """On a GPU the host reads step t while step t + 1 runs, so a row it ends gets one more token, which is
    cut: streamed and unstreamed tokens agree, and an ended row holds pad right after its last token."""
    import copy

    model = copy.deepcopy(tiny_model).cuda()
    embeds = prompt.cuda()
    decoder = FastDecoder(model)
    unstreamed = decoder.generate(embeds, 24).cpu()
    seen = []

    def end_row_1_at_step_5(tokens):
        seen.append(tokens)
        return [1] if len(seen) == 6 else []

    streamed = decoder.generate(embeds, 24, on_tokens=end_row_1_at_step_5).cpu()
    assert [step[0] for step in seen] == unstreamed[0].tolist()
    assert streamed[0].tolist() == unstreamed[0].tolist()
    assert streamed[1].tolist() == unstreamed[1, :6].tolist() + [0] * 18
    assert [step[1] for step in seen[6:]] == [0] * 18


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.2])
def test_beam_search_gives_generates_beams(tiny_model, prompt, repetition_penalty):
    """generate(num_beams=3)'s tokens: left-padded prompts, with and without an end of sequence, the official
    chat's repetition penalty, and min_new_tokens."""
    embeds = prompt.clone()
    embeds[1, :5] = 0
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    mask[1, :5] = 0
    free = FastDecoder(tiny_model).generate(embeds[:1], 30)[0].tolist()
    decoder = FastDecoder(tiny_model)
    ended = []  # rows whose best hypothesis ends with eos before the limit
    for eos, extra in ((None, {}), (free[4], {}), (free[4], {"min_new_tokens": 8}), (free[1], {})):
        ours = decoder.beam_search(embeds, 20, 3, eos_token_id=eos, repetition_penalty=repetition_penalty, attention_mask=mask, **extra)
        with torch.inference_mode():
            theirs = tiny_model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                do_sample=False,
                num_beams=3,
                pad_token_id=0,
                max_new_tokens=20,
                eos_token_id=eos,
                repetition_penalty=repetition_penalty,
                **extra,
            )
        for row in range(2):  # generate fills a row past its end with eos, FastDecoder with pad
            mine, its = ours[row].tolist(), theirs[row].tolist()
            if eos is not None and eos in its:
                its = its[: its.index(eos) + 1]
                mine = mine[: len(its)]
                ended.append(len(its))
            assert mine == its, (eos, extra, row)
    assert len(set(ended)) > 1  # hypotheses ended at different lengths: finished beams and the output's cut are covered
    assert decoder.beam_search(embeds[:1], 1, 3).shape == (1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled step and its CUDA graph need a GPU (run on the device machine)")
def test_beam_search_on_a_gpu_gives_generates_beams(tiny_model, prompt):
    """The beam step (cache reordered in place) compiled and replayed from a CUDA graph: generate's beams."""
    import copy

    model = copy.deepcopy(tiny_model).cuda()
    embeds = prompt.cuda()
    ours = FastDecoder(model).beam_search(embeds, 24, 3, repetition_penalty=1.2).cpu()
    theirs = _generate(model, embeds, num_beams=3, max_new_tokens=24, eos_token_id=None, repetition_penalty=1.2).cpu()
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
def test_a_recorded_eager_step_on_a_gpu_gives_generates_tokens(tiny_model, prompt, monkeypatch):
    """compile=False: the eager decoder step captured as CUDA graphs (no compilation), one per cache window,
    greedy and beams, across a window's edge (position 128)."""
    import copy

    monkeypatch.setattr(fast_decoding, "FIRST_WINDOW", 16)
    model = copy.deepcopy(tiny_model).cuda()
    embeds = prompt.cuda()
    new = 136 - embeds.shape[1]
    assert 128 - embeds.shape[1] > 0
    decoder = FastDecoder(model, compile=False)
    greedy = decoder.generate(embeds, new, sampling=Sampling(repetition_penalty=1.2))
    loop = next(iter(decoder._slot(2).loops.values()))
    assert len(loop.windows) > 1 and loop.graphs.keys() == set(loop.windows)  # replayed, not eager
    beams = decoder.beam_search(embeds[:1], new, 3, repetition_penalty=1.2)
    with torch.inference_mode():
        kwargs = {"attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"), "pad_token_id": 0}
        kwargs |= {"do_sample": False, "max_new_tokens": new, "eos_token_id": None, "repetition_penalty": 1.2}
        plain = model.generate(inputs_embeds=embeds, num_beams=1, min_new_tokens=new, **kwargs)
        kwargs["attention_mask"] = kwargs["attention_mask"][:1]
        plain_beams = model.generate(inputs_embeds=embeds[:1], num_beams=3, **kwargs)
    assert torch.equal(greedy.cpu(), plain.cpu())
    assert torch.equal(beams.cpu(), plain_beams.cpu())


def test_the_compiled_prefill_serves_every_prompt_length_with_one_graph(tiny_model):
    """FastDecoder's GPU prefill, compiled here on the CPU (inductor's C++ kernels): left-padded prompts of new
    lengths reuse the first graph (no compilation per length) and fill the cache as the eager prefill does."""
    from torch._dynamo.utils import counters

    prefill, config, cache_len = compiled_prefill(), tiny_model.config, 256
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for length in (37, 113, 250, 2):
            mask = torch.ones(2, length, dtype=torch.long)
            mask[1, : length // 2] = 0
            padding = torch.ones(2, cache_len, dtype=torch.long)
            padding[:, :length] = mask
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            embeds = torch.randn(2, length, config.hidden_size, generator=torch.Generator().manual_seed(length)) * mask[..., None]
            caches = [StaticCache(config=config, max_cache_len=cache_len) for _ in range(2)]
            ours = prefill(tiny_model.llm, caches[0], embeds, position_ids, padding)
            theirs = _prefill_forward(tiny_model.llm, caches[1], embeds, position_ids, padding)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
            for mine, reference in zip(caches[0].layers, caches[1].layers):
                torch.testing.assert_close(mine.keys[..., :length, :], reference.keys[..., :length, :], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(mine.values[..., :length, :], reference.values[..., :length, :], rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_answers_whose_tokens_are_the_pad_id_keep_their_length(tiny_checkpoint_fp32, tiny_tokenizer):
    """A model whose every token is 0 (<unk>, also the pad id; lm_head zeroed, so argmax takes the first id): each
    answer still holds all its tokens, fast and plain, streamed or not (lengths once came from trailing pad ids)."""
    from axolotl_minicpmv import MiniCPMV
    from axolotl_minicpmv.inference.generate import generate_answers

    model = MiniCPMV.from_pretrained(tiny_checkpoint_fp32, dtype=torch.float32).eval()
    with torch.no_grad():
        model.llm.lm_head.weight.zero_()
    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, model.config)
    conversations = [[{"role": "user", "content": q}] for q in ("What is 17 times 3?", "Hello?")]
    for fast in (True, False):
        answers = generate_answers(model, processor, conversations, None, fast=fast, max_new_tokens=5, num_beams=1)
        assert [(a.token_ids, a.finish_reason) for a in answers] == [([0] * 5, "length")] * 2
        streamed = generate_answers(
            model, processor, conversations, None, fast=fast, max_new_tokens=5, num_beams=1, on_tokens=lambda tokens: [1]
        )
        assert [a.token_ids for a in streamed] == [[0] * 5, [0]]  # row 1 ended at its first token


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_a_lone_prompt_left_padded_to_whole_blocks_gives_generates_tokens(tiny_model, prompt, cut):
    """A lone prompt is left-padded to a multiple of PREFILL_BLOCK tokens (so that nearby lengths share a recorded
    prefill on a GPU): greedy tokens stay generate's for prompts of three lengths, one of them a whole block."""
    block = fast_decoding.PREFILL_BLOCK
    single = prompt[:1, : block + 1 - cut]  # block + 1, block and block - 1 tokens
    assert single.shape[1] == block + 1 - cut
    ours = FastDecoder(tiny_model).generate(single, 16)
    assert torch.equal(ours, _generate(tiny_model, single, max_new_tokens=16, min_new_tokens=16, eos_token_id=None))


def test_a_lone_prompts_padding_never_grows_its_cache(tiny_model, prompt):
    """The padding takes only the room left in the cache: a request that fits the reserved cache (a server's context)
    is padded less and neither grows the cache nor changes its tokens."""
    single = prompt[:1]
    decoder = FastDecoder(tiny_model)
    decoder.reserve(1, 256)
    cache = decoder._slot(1).cache
    new = 256 - single.shape[1] - 5  # room for 5 of the padding's tokens
    assert -single.shape[1] % fast_decoding.PREFILL_BLOCK > 5
    ours = decoder.generate(single, new)
    assert decoder._slot(1).cache is cache and decoder._slot(1).key == (1, 256)
    assert torch.equal(ours, _generate(tiny_model, single, max_new_tokens=new, min_new_tokens=new, eos_token_id=None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
@pytest.mark.parametrize("compile", [False, True])
def test_a_lone_prompts_prefill_on_a_gpu_replays_a_graph_with_generates_tokens(tiny_model, prompt, compile):
    """On a GPU a lone prompt's prefill is recorded as a CUDA graph the second time its padded length comes and
    replayed after, eager (chat()'s default) or compiled; a prompt one token shorter replays the same graph, and
    every answer is generate's (float32)."""
    import copy

    model = copy.deepcopy(tiny_model).cuda()
    single = prompt[:1].cuda()
    shorter = single[:, 1:]
    block = fast_decoding.PREFILL_BLOCK
    assert -(-single.shape[1] // block) == -(-shorter.shape[1] // block)  # one padded length
    decoder = FastDecoder(model, compile=compile)
    for embeds, graphs in ((single, 0), (single, 1), (shorter, 1), (single, 1)):
        ours = decoder.generate(embeds, 12)
        plain = _generate(model, embeds, max_new_tokens=12, min_new_tokens=12, eos_token_id=None)
        assert torch.equal(ours.cpu(), plain.cpu())
        assert len(decoder._slot(1).prefill_graphs.graphs) == graphs


def test_a_row_ended_by_on_tokens_at_its_last_token_finishes_with_stop(tiny_model, tiny_tokenizer):
    """A stopping criterion wins over the length limit reached by the same token, on both paths."""
    from axolotl_minicpmv.inference.generate import generate_answers
    from axolotl_minicpmv.model.processing_minicpmv import MiniCPMVProcessor

    processor = MiniCPMVProcessor.from_config(tiny_tokenizer, tiny_model.config)
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Tell me more"}]]
    for fast in (False, True):
        steps = 0

        def on_tokens(tokens):
            nonlocal steps
            steps += 1
            return [0] if steps == 5 else []

        out = generate_answers(
            tiny_model, processor, conversations, [[], []], max_new_tokens=5, num_beams=1, fast=fast, on_tokens=on_tokens
        )
        assert [(len(g.token_ids), g.finish_reason) for g in out] == [(5, "stop"), (5, "length")], fast
