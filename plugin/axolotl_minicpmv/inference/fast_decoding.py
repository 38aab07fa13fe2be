"""Decoding without a host synchronisation per token: static KV cache, one CUDA graph per step.

`generate()` checks its stopping criteria on the host after every token, and at batch 1 its per-step
Python work costs more than the GPU's. Here a whole decoding step (compiled decoder forward over a
transformers `StaticCache`, token choice, bookkeeping) is one CUDA graph, and the host reads the
end-of-sequence flags only every `sync_every` tokens.

Greedy decoding emits the tokens of `generate(num_beams=1, do_sample=False)` and beam search those of
`generate(num_beams=K)` (in float32: tests/test_fast_decoding.py; on the GPU
benchmarks/gpu_checks/check_fast_decode.py compares them); sampling draws from the same distribution
(repetition penalty over generated tokens, then generate's own temperature, top-k and top-p warpers) with
its own random stream.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging

from .cuda_graphs import record_cuda_graph
from .decode_mask import decode_block_mask, decode_window_mask

logger = logging.get_logger(__name__)


# Coordinate-descent tuning turns the batch-1 matrix-vector products into tuned Triton reductions, and freezing
# compiles the weights in as constants (each measured faster: benchmarks/RESULTS.md).
STEP_COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "freezing": True}

# The recorded eager step reads the cache in windows of FIRST_WINDOW, 2 * FIRST_WINDOW, ... positions (one graph
# each) while the answer is short: chat()'s 1,024 new tokens size its cache to 2,048 positions, and a dense step
# over all of them would read four times the keys and values of a 512-position one at every token.
FIRST_WINDOW = 512

# A lone prompt is left-padded to a multiple of PREFILL_BLOCK tokens, so that prompts of nearby lengths (one picture
# size, other questions) share one recorded prefill graph (_PrefillGraphs). Its prefill is bound by the host
# launching kernels (1,344x896, one H100: compiled 13-17 ms of wall for 6.8 ms of kernels, eager 33-41 for 11.8;
# benchmarks/RESULTS.md 2026-11-27); at most 63 padding tokens cost far less than those launches.
PREFILL_BLOCK = 64
MAX_PREFILL_GRAPHS = 8


def cache_windows(cache_len: int) -> tuple[int, ...]:
    """The windows a recorded step's graphs read: FIRST_WINDOW doubled up to, and ending with, `cache_len`."""
    windows, window = [], FIRST_WINDOW
    while window < cache_len:
        windows.append(window)
        window *= 2
    return (*windows, cache_len)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the defaults are greedy decoding."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling settings {self}")

    def warpers(self) -> LogitsProcessorList:
        """generate()'s temperature, top-k and top-p warpers, in its order (all fixed-shape, so they capture)."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


def penalise_repeats(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """generate's RepetitionPenaltyLogitsProcessor, over a fixed-shape mask of each row's generated tokens."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def choose_tokens(logits: torch.Tensor, seen: torch.Tensor | None, sampling: Sampling, generator=None) -> torch.Tensor:
    """(batch, vocab) float logits -> (batch,) token ids, without reading anything back to the host."""
    if seen is not None:
        logits = penalise_repeats(logits, seen, sampling.repetition_penalty)
    if not sampling.do_sample:
        return logits.argmax(-1)
    probs = sampling.warpers()(None, logits).softmax(-1)
    # Exponential race (Gumbel-max): argmax of p / Exp(1) is a draw from p, with no host synchronisation.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


# Both forwards take the loop's (batch, cache length) padding mask: 0 over a row's left padding, 1 elsewhere
# (positions past the current token are hidden by causality). transformers' static-cache masks read it as is.
def _prefill_forward(llm, cache: StaticCache, inputs_embeds, position_ids, attention_mask) -> torch.Tensor:
    return llm(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]


def compiled_prefill() -> Callable:
    """`_prefill_forward` compiled once for any prompt length: the prompt's dimension is marked dynamic on each
    call, so a new length reuses the graph (eager, the prefill is bound by the host launching ~2,000 small kernels)."""
    compiled = torch.compile(_prefill_forward, fullgraph=True)

    def prefill(llm, cache: StaticCache, inputs_embeds, position_ids, attention_mask) -> torch.Tensor:
        torch._dynamo.mark_dynamic(inputs_embeds, 1)
        torch._dynamo.mark_dynamic(position_ids, 1)
        return compiled(llm, cache, inputs_embeds, position_ids, attention_mask)

    return prefill


def _decode_forward(llm, cache: StaticCache, tokens, positions, attention_mask, cache_index, block_sparse: bool = False) -> torch.Tensor:
    # Block-sparse, each row reads only the cache blocks it attends to (decode_mask); dense, SDPA reads the whole
    # cache, or with a padding mask cut short (a window), its first positions only.
    if block_sparse:
        attention_mask = decode_block_mask(attention_mask, cache_index)
    elif attention_mask.shape[1] < cache.get_max_length():
        attention_mask = decode_window_mask(attention_mask, cache_index)
    return llm(
        input_ids=tokens, position_ids=positions, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]


def compiled_step(block_sparse: bool) -> Callable:
    """`_decode_forward` as FastDecoder's CUDA graphs replay it: fixed shapes, STEP_COMPILE_OPTIONS."""
    step = functools.partial(_decode_forward, block_sparse=block_sparse)
    return torch.compile(step, fullgraph=True, dynamic=False, options=STEP_COMPILE_OPTIONS)


class _DecodeLoop:
    """Static buffers for one batch size, cache and set of settings, and on a GPU the CUDA graphs of one
    decoding step over them (compiled decoder forward + token choice + bookkeeping, all on the device), one for
    each of the cache's `windows` (a step reads the smallest window that holds its position; default: one
    window, the whole cache)."""

    def __init__(self, forward, llm, cache: StaticCache, batch: int, sampling: Sampling, eos_token_id, pad_token_id, device, windows=None):
        self.forward, self.llm, self.cache = forward, llm, cache
        self.windows = tuple(windows or (cache.get_max_length(),))
        self.next_index = 0  # the host's count of where the next step's keys go (cache_index, without reading it)
        self.sampling, self.eos_token_id, self.pad_token_id = sampling, eos_token_id, pad_token_id
        vocab = llm.config.vocab_size
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)  # fed to the next step
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)  # each row's next position
        self.padding = torch.ones((batch, cache.get_max_length()), dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # tokens chosen so far
        self.cache_index = torch.zeros((), dtype=torch.long, device=device)  # where the next step's keys go
        # a value on the device, not a setting: one graph serves every request's min_new_tokens
        self.min_new = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros((batch, cache.get_max_length()), dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device) if sampling.repetition_penalty != 1.0 else None
        self.is_eos = None
        if eos_token_id is not None:
            self.is_eos = torch.arange(vocab, device=device) == eos_token_id
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # window -> the step's graph

    def start(self, attention_mask: torch.Tensor, max_new_tokens: int = 1, min_new_tokens: int = 0) -> None:
        """Reset for prompts of this (batch, prompt length) left-padding mask (`max_new_tokens`: for the beam
        loop, which ends hypotheses at that length on the device; this loop's host stops it); eos is kept
        away until `min_new_tokens` tokens."""
        self.cache.reset()
        self.min_new.fill_(min_new_tokens)
        self.padding.fill_(1)
        self.padding[:, : attention_mask.shape[1]].copy_(attention_mask)
        self.positions.copy_(attention_mask.sum(-1, keepdim=True))
        self.cache_index.fill_(attention_mask.shape[1])
        self.next_index = attention_mask.shape[1]
        self.step.zero_()
        self.out.fill_(self.pad_token_id)
        self.finished.zero_()
        if self.seen is not None:
            self.seen.zero_()

    def advance(self, logits: torch.Tensor, window: int | None = None) -> None:
        """Choose the next tokens from (batch, vocab) logits and record them (`window`: the cache positions the
        step read, all that is written so far)."""
        if self.is_eos is not None:
            logits = logits.masked_fill(self.is_eos & (self.step < self.min_new), float("-inf"))
        tokens = choose_tokens(logits, self.seen, self.sampling)
        if self.is_eos is not None:
            tokens = tokens.masked_fill(self.finished, self.pad_token_id)
            self.finished |= tokens == self.eos_token_id
        self.out.index_copy_(1, self.step, tokens[:, None])
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        self.tokens.copy_(tokens[:, None])
        self.step += 1

    def decode_one(self, window: int | None = None) -> None:
        padding = self.padding if window is None else self.padding[:, :window]
        logits = self.forward(self.llm, self.cache, self.tokens, self.positions, padding, self.cache_index)
        self.positions += 1
        self.cache_index += 1
        self.advance(logits, window)

    def capture(self) -> None:
        """Record decode_one for each window as a CUDA graph, after warm-up runs (compilation) on a side stream."""
        for window in self.windows:
            self.start(self.padding[:, :0])
            self.graphs[window], _ = record_cuda_graph(functools.partial(self.decode_one, window), warmup_runs=3)

    def run_one(self) -> None:
        window = next((w for w in self.windows if w > self.next_index), self.windows[-1])
        self.next_index += 1
        if self.graphs:
            self.graphs[window].replay()
        else:
            self.decode_one(window)


class _BeamLoop(_DecodeLoop):
    """`generate(num_beams=K)`'s beam search (transformers' vectorised one: 2K candidates a step, finished
    hypotheses scored with the length penalty, its early-stop heuristic) in fixed shapes, so that a step is
    one CUDA graph like the greedy one. Rows b*K .. b*K+K-1 of the cache are prompt b's beams; rows past
    batch*K are fillers. The penalty and min_new_tokens act on log-probabilities, as in generate's beam search.
    """

    def __init__(
        self,
        forward,
        llm,
        cache,
        rows,
        batch,
        num_beams,
        length_penalty,
        repetition_penalty,
        eos_token_id,
        pad_token_id,
        device,
        windows=None,
    ):
        super().__init__(
            forward, llm, cache, rows, Sampling(repetition_penalty=repetition_penalty), eos_token_id, pad_token_id, device, windows
        )
        self.batch, self.num_beams, self.length_penalty = batch, num_beams, length_penalty
        length = cache.get_max_length()
        self.max_new = torch.zeros(1, dtype=torch.long, device=device)
        self.running = torch.zeros((batch, num_beams, length), dtype=torch.long, device=device)  # running beams' tokens
        self.running_scores = torch.zeros((batch, num_beams), dtype=torch.float32, device=device)
        self.best = torch.zeros((batch, num_beams, length), dtype=torch.long, device=device)  # finished hypotheses
        self.best_scores = torch.zeros((batch, num_beams), dtype=torch.float32, device=device)
        self.best_lengths = torch.zeros((batch, num_beams), dtype=torch.long, device=device)
        self.best_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)  # the early-stop heuristic
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.first_candidates = torch.arange(2 * num_beams, device=device) < num_beams
        self.row_offsets = torch.arange(batch, device=device)[:, None] * num_beams
        self.filler_rows = torch.arange(batch * num_beams, rows, device=device)

    def start(self, attention_mask: torch.Tensor, max_new_tokens: int = 1, min_new_tokens: int = 0) -> None:
        super().start(attention_mask, max_new_tokens, min_new_tokens)
        self.max_new.fill_(max_new_tokens)
        self.running.fill_(self.pad_token_id)
        self.running_scores.fill_(-1e9)
        self.running_scores[:, 0] = 0.0  # the beams start equal: only the first one's continuations count
        self.best.fill_(self.pad_token_id)
        self.best_scores.fill_(-1e9)
        self.best_lengths.zero_()
        self.best_finished.zero_()
        self.improvable.fill_(True)
        self.done.fill_(False)

    def advance(self, logits: torch.Tensor, window: int | None = None) -> None:
        batch, beams, vocab = self.batch, self.num_beams, logits.shape[-1]
        log_probs = logits[: batch * beams].float().log_softmax(-1)
        if self.seen is not None:
            log_probs = penalise_repeats(log_probs, self.seen[: batch * beams], self.sampling.repetition_penalty)
        if self.is_eos is not None:
            log_probs = log_probs.masked_fill(self.is_eos & (self.step < self.min_new), float("-inf"))
        scores = (log_probs.view(batch, beams, vocab) + self.running_scores[:, :, None]).view(batch, beams * vocab)
        top_scores, top = scores.topk(2 * beams)
        source, tokens = top // vocab, top % vocab
        length = self.running.shape[-1]
        candidates = self.running.gather(1, source[:, :, None].expand(-1, -1, length))
        candidates.scatter_(2, self.step.view(1, 1, 1).expand(batch, 2 * beams, 1), tokens[:, :, None])
        ends = self.step + 1 >= self.max_new
        if self.is_eos is not None:
            ends = ends | (tokens == self.eos_token_id)
        else:
            ends = ends.expand(batch, 2 * beams)
        # the best K candidates that go on
        going = top_scores + ends.float() * -1.0e9
        keep = going.topk(beams).indices
        kept_source, kept_tokens = source.gather(1, keep), tokens.gather(1, keep)
        self.running.copy_(candidates.gather(1, keep[:, :, None].expand(-1, -1, length)))
        self.running_scores.copy_(going.gather(1, keep))
        # finished hypotheses: the first K candidates that ended, scored with the length penalty
        just_finished = ends & self.first_candidates
        finished_scores = top_scores / (self.step + 1).float() ** self.length_penalty
        finished_scores = finished_scores + (~self.improvable).float() * -1.0e9 + (~just_finished) * -1.0e9
        merged_scores = torch.cat([self.best_scores, finished_scores], 1)
        pick = merged_scores.topk(beams).indices
        lengths = torch.cat([self.best_lengths, (self.step + 1).expand(batch, 2 * beams)], 1)
        # generate stops once done; steps run past it (the host looks every `sync_every`) change nothing
        for kept, merged in (
            (self.best, torch.cat([self.best, candidates], 1).gather(1, pick[:, :, None].expand(-1, -1, length))),
            (self.best_scores, merged_scores.gather(1, pick)),
            (self.best_lengths, lengths.gather(1, pick)),
            (self.best_finished, torch.cat([self.best_finished, just_finished], 1).gather(1, pick)),
        ):
            kept.copy_(torch.where(self.done, kept, merged))
        # the cache, the generated-token masks and the next inputs follow the beams that go on
        order = (kept_source + self.row_offsets).view(-1)
        rows = torch.cat([order, self.filler_rows])
        for layer in self.cache.layers:  # only the positions written so far (the step's window) need to move
            for kept in (layer.keys[:, :, :window], layer.values[:, :, :window]):
                kept.copy_(kept.index_select(0, rows))
        if self.seen is not None:
            self.seen[: batch * beams].copy_(self.seen[: batch * beams].index_select(0, order))
            self.seen[: batch * beams].scatter_(1, kept_tokens.view(-1, 1), True)
        self.tokens[: batch * beams].copy_(kept_tokens.view(-1, 1))
        self.step += 1
        # generate's early-stop heuristic, then its stopping condition
        best_possible = self.running_scores[:, :1] / self.step.float() ** self.length_penalty
        worst_kept = torch.where(self.best_finished, self.best_scores.min(1, keepdim=True).values, -1.0e9)
        self.improvable &= (best_possible > worst_kept).any(-1, keepdim=True)
        self.done |= ~self.improvable.any() | ends.all()

    def result(self) -> torch.Tensor:
        """(batch, n) tokens of each prompt's best hypothesis, pad after its end."""
        lengths = self.best_lengths[:, 0]
        out = self.best[:, 0, : int(lengths.max())].clone()
        return out.masked_fill(torch.arange(out.shape[1], device=out.device) >= lengths[:, None], self.pad_token_id)


class _PrefillGraphs:
    """A lone prompt's prefill (`prefill`, compiled or eager) replayed from a CUDA graph per prompt length over
    one cache. A length is recorded the second time it comes (recording costs a few prefills, so a one-off length
    never pays for it); the last MAX_PREFILL_GRAPHS lengths are kept, their intermediates in one shared memory
    pool (the graphs never run at the same time). Like the direct prefill, a replay expects the cache reset
    (`_DecodeLoop.start`); the warm-up runs before a recording each reset it themselves, and leave it reset."""

    def __init__(self, prefill: Callable, cache: StaticCache):
        self.prefill, self.cache = prefill, cache
        self.seen: set[int] = set()
        self.graphs: OrderedDict = OrderedDict()  # length -> (graph, its static inputs, its logits)
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, llm, cache: StaticCache, inputs_embeds, position_ids, attention_mask) -> torch.Tensor:
        length = inputs_embeds.shape[1]
        if length not in self.graphs and length in self.seen:
            self._record(llm, inputs_embeds, position_ids, attention_mask)
        self.seen.add(length)
        if length not in self.graphs:
            return self.prefill(llm, cache, inputs_embeds, position_ids, attention_mask)
        self.graphs.move_to_end(length)
        graph, inputs, logits = self.graphs[length]
        for static, given in zip(inputs, (inputs_embeds, position_ids, attention_mask)):
            static.copy_(given)
        graph.replay()
        return logits

    def _record(self, llm, inputs_embeds, position_ids, attention_mask) -> None:
        inputs = tuple(t.clone() for t in (inputs_embeds, position_ids, attention_mask))

        def prefill():
            if not torch.cuda.is_current_stream_capturing():  # a warm-up run: each fills the cache from the start
                self.cache.reset()
            return self.prefill(llm, self.cache, *inputs)

        graph, logits = record_cuda_graph(prefill, warmup_runs=2, pool=self.pool)
        self.cache.reset()  # the warm-ups filled it; the replay that follows starts from empty, as the caller left it
        self.graphs[inputs_embeds.shape[1]] = (graph, inputs, logits)
        if len(self.graphs) > MAX_PREFILL_GRAPHS:
            self.graphs.popitem(last=False)


@dataclass
class _CacheSlot:
    """A `StaticCache` kept for reuse, its (batch, length), the decoding step its loops run and the loops."""

    step: Callable
    windowed: bool  # the step reads the cache in windows (cache_windows), else whole
    cache: StaticCache | None = None
    key: tuple[int, int] | None = None
    loops: OrderedDict = field(default_factory=OrderedDict)  # settings -> _DecodeLoop, least recently used first
    prefill_graphs: _PrefillGraphs | None = None  # a lone prompt's recorded prefills over this cache (on a GPU)


class FastDecoder:
    """Greedy or sampled decoding (`generate`) and beam search (`beam_search`) for `MiniCPMV` from prompt
    embeddings (see `MiniCPMV.embed_inputs`).

    The decoder's q/k/v and gate/up projections run fused and lm_head's weight padded to a multiple of 64 rows
    (`MiniCPMForCausalLM.fuse_projections`: the separate weights become views of the stacked ones, so no memory
    is added). On a GPU the prefill is compiled for any prompt length, and each decoding step is one CUDA graph
    replay: the decoder forward is compiled (torch.compile, fixed shapes) and captured together with the
    token choice, so the host only queues replays and reads the end-of-sequence flags every `sync_every`
    tokens (streaming: see `on_tokens`). Static caches are kept, sized to the next power of two (at least
    256) of prompt + new tokens and reused while requests fit: one for single prompts (`chat`, a server's
    lone client) and one for batches. A shorter request's compiled dense step attends over its cache's unused tail (with
    `block_sparse`, a batch's step skips it and each row's left padding in blocks: see decode_mask), a smaller
    batch is filled up with copies of its last row (dropped from the output), so neither recompiles; a longer
    request or a larger batch grows its cache and compiles once more, another set of sampling settings
    captures one more graph (the last `max_loops` per cache are kept). Prompts of different lengths come
    left-padded with their attention mask, as for `generate`. On CPU the same loop runs eagerly. Sampling
    uses torch's global RNG.

    `compile=False` records the eager decoder step as the CUDA graph instead (the prefill runs eagerly): no
    compilation, so a new process answers within seconds, at the price of slower steps (`chat()`'s default on a GPU).
    Its dense step reads the cache in windows (FIRST_WINDOW positions, doubling; one graph each), so the unused
    tail of a cache sized for a long `max_new_tokens` is not read while the answer is short.
    """

    def __init__(self, model, sync_every: int = 16, max_loops: int = 8, compile: bool = True, block_sparse: bool = False):
        self.model = model
        self.sync_every = sync_every
        self.on_gpu = model.device.type == "cuda"
        # One q/k/v and one gate/up product per layer: fewer, larger kernels in every step (measured on an H100:
        # +11 % tokens/s at batch 8 compiled, +6 % at batch 1 recorded eager, -3 % at batch 1 compiled; RESULTS.md).
        # lm_head is padded to aligned rows too: +8.6 % at batch 8 compiled (an align-1 GEMM otherwise).
        fused = model.llm.fuse_projections()
        logger.info(f"FastDecoder: {fused} of {2 * len(model.llm.model.layers)} projection groups fused (LoRA-wrapped ones stay apart)")
        self.compiled = self.on_gpu and compile
        # block_sparse: a batch's step attends only to the cache blocks each row sees (decode_mask), skipping its
        # left padding and the cache's unwritten tail (H100, batch 8, 512 positions: +6 % tokens/s; on a GPU
        # init_fast_path turns it on, benchmarks/RESULTS.md 2026-12-07). A single prompt's step stays dense: its
        # cache is small beside the weights, and at batch 1 the sparse mask's per-layer work cost more than it
        # saved (3.35 ms of kernels a step against 3.12). The recorded eager step is dense too: flex attention's
        # fused kernel exists only compiled (on CPU the eager loop runs flex's reference implementation, the
        # tests' path).
        self.block_sparse = block_sparse and (self.compiled or not self.on_gpu)
        if self.compiled:
            # Frozen weights may be folded into the compiled step: make a new FastDecoder after changing them
            # (merging an adapter, say).
            batch_step, single_step = compiled_step(self.block_sparse), compiled_step(False)
            self._prefill = compiled_prefill()
        else:
            batch_step, single_step = (functools.partial(_decode_forward, block_sparse=sparse) for sparse in (self.block_sparse, False))
            self._prefill = _prefill_forward
        # A lone prompt in a cache sized for a batch would pay for the fillers' prefill (its first token) and
        # their attention over the whole cache (every step): single prompts keep a cache of their own.
        # The eager dense step through SDPA reads the cache in windows; a compiled one reads it whole (one
        # window: one compilation) or in blocks (block_sparse).
        windowed = not self.compiled and model.config._attn_implementation == "sdpa"
        self._single = _CacheSlot(single_step, windowed)
        self._batched = _CacheSlot(batch_step, windowed and not self.block_sparse)
        self.max_loops = max_loops

    def _slot(self, batch: int) -> _CacheSlot:
        return self._single if batch == 1 else self._batched

    def reserve(self, batch: int, length: int) -> None:
        """Size the cache that `batch` rows use for prompt + new tokens up to `length` now (it only grows), so
        that the requests of a run up to that size neither grow it nor compile again; the step compiles on the
        first request. For callers that know their largest request ahead (predict, a server's context)."""
        self._cache_for(self._slot(batch), batch, length)

    def _cache_for(self, slot: _CacheSlot, batch: int, length: int) -> None:
        # A kept cache that is large enough serves smaller requests too: attending over its unused tail and
        # decoding filler rows cost a little bandwidth per token, a new cache size costs a compilation (about a minute).
        # The cache only grows (a long request after a large batch keeps the batch size, and back), so requests
        # that alternate between them do not compile in turn.
        cache_len = max(256, 1 << (length - 1).bit_length())
        if slot.key is not None:
            batch, cache_len = max(batch, slot.key[0]), max(cache_len, slot.key[1])
        if slot.key != (batch, cache_len):
            # The loops' graphs point into the old cache: free both before allocating. If the new one does not
            # fit (out of memory), nothing is kept, and the next request gets a cache of its own size.
            slot.loops.clear()
            slot.cache, slot.key, slot.prefill_graphs = None, None, None
            config = self.model.config
            cache = StaticCache(config=config, max_cache_len=cache_len)
            # Allocated now, outside any graph capture (it is otherwise allocated by its first update).
            cache.early_initialization(batch, config.num_key_value_heads, config.head_dim, self.model.dtype, self.model.device)
            slot.cache, slot.key = cache, (batch, cache_len)
            if self.on_gpu and slot is self._single:
                slot.prefill_graphs = _PrefillGraphs(self._prefill, cache)

    def _loop_for(self, batch: int, length: int, settings: tuple, make_loop) -> _DecodeLoop:
        slot = self._slot(batch)
        self._cache_for(slot, batch, length)
        batch = slot.key[0]
        if settings not in slot.loops:
            windows = cache_windows(slot.key[1]) if slot.windowed else None
            slot.loops[settings] = make_loop(slot.step, slot.cache, batch, windows)
            if len(slot.loops) > self.max_loops:
                slot.loops.popitem(last=False)
        slot.loops.move_to_end(settings)
        return slot.loops[settings]

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        min_new_tokens: int = 0,
        sampling: Sampling = Sampling(),
        attention_mask: torch.Tensor | None = None,
        on_tokens: Callable[[list[int]], Iterable[int]] | None = None,
    ) -> torch.LongTensor:
        """New token ids (batch, n <= max_new_tokens) for prompts left-padded under `attention_mask` (batch,
        prompt length; none: no padding); after its eos a row holds pad ids.

        `on_tokens` (streaming): called with each step's tokens, one per row (pad for rows that have ended),
        it returns the rows to end there (a stop string, a row's own limit, a disconnect); an ended row holds
        pad ids after that token, as after an eos."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        batch, prompt_len, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones((batch, prompt_len), dtype=torch.long, device=inputs_embeds.device)
        settings = (sampling, eos_token_id, pad_token_id)

        def make_loop(step, cache, rows, windows):
            return _DecodeLoop(step, self.model.llm, cache, rows, *settings, device=self.model.device, windows=windows)

        loop = self._prefilled_loop(inputs_embeds, attention_mask, max_new_tokens, min_new_tokens, settings, make_loop)
        if on_tokens is None:
            for step in range(1, max_new_tokens):
                if eos_token_id is not None and step % self.sync_every == 0 and bool(loop.finished[:batch].all()):
                    break
                loop.run_one()
            out = loop.out[:batch, :max_new_tokens].clone()
        else:
            out = self._stream(loop, batch, max_new_tokens, eos_token_id, pad_token_id, on_tokens)
        if eos_token_id is None:
            return out
        # Like generate: stop after the column where the last row finished.
        before_eos = ((out == eos_token_id).cumsum(-1) == 0).sum(-1)
        return out[:, : int((before_eos + 1).clamp(max=max_new_tokens).max())]

    def _prefilled_loop(
        self, inputs_embeds, attention_mask, max_new_tokens: int, min_new_tokens: int, settings: tuple, make_loop
    ) -> _DecodeLoop:
        """The loop for these settings (its graph captured on first use), started and fed the prompt's logits. A
        lone prompt is left-padded to a multiple of PREFILL_BLOCK tokens where its cache has the room (on a GPU its
        prefill replays a graph)."""
        rows, prompt_len, _ = inputs_embeds.shape
        loop = self._loop_for(rows, prompt_len + max_new_tokens, settings, make_loop)
        cache_rows, cache_len = self._slot(rows).key
        # The padding takes only room the cache has: a cache sized for the largest request (a server's context)
        # must not grow, and compile, for a padded one.
        pad = min(-prompt_len % PREFILL_BLOCK, cache_len - prompt_len - max_new_tokens) if rows == 1 else 0
        if pad:
            inputs_embeds = torch.nn.functional.pad(inputs_embeds, (0, 0, pad, 0))
            attention_mask = torch.nn.functional.pad(attention_mask, (pad, 0))
        if self.on_gpu and not loop.graphs and max_new_tokens > 1:  # a first token alone needs no graph
            if self.compiled:
                logger.warning(f"FastDecoder: compiling the decoding step for batch {cache_rows}, cache {cache_len} (once; about a minute)")
            loop.capture()
        fillers = cache_rows - rows
        if fillers:
            inputs_embeds = torch.cat([inputs_embeds, inputs_embeds[-1:].expand(fillers, -1, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(fillers, -1)])
        attention_mask = attention_mask.to(torch.long)
        loop.start(attention_mask, max_new_tokens, min_new_tokens)
        # generate()'s prefill positions: counted over attended tokens, 1 under padding (never attended).
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        prefill = self._slot(rows).prefill_graphs or self._prefill
        loop.advance(prefill(self.model.llm, loop.cache, inputs_embeds, position_ids, loop.padding))
        return loop

    @torch.inference_mode()
    def beam_search(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int,
        num_beams: int,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """`generate(num_beams=num_beams, do_sample=False)`'s tokens (batch, n): each prompt's best hypothesis,
        pad after its end. Each prompt's beams are rows of the static cache, reordered in place every step."""
        if max_new_tokens < 1 or num_beams < 2:
            raise ValueError(f"beam search needs max_new_tokens >= 1 and num_beams >= 2, got {max_new_tokens}, {num_beams}")
        batch, prompt_len, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones((batch, prompt_len), dtype=torch.long, device=inputs_embeds.device)
        settings = ("beams", batch, num_beams, length_penalty, repetition_penalty, eos_token_id, pad_token_id)

        def make_loop(step, cache, rows, windows):
            return _BeamLoop(step, self.model.llm, cache, rows, *settings[1:], device=self.model.device, windows=windows)

        embeds, mask = inputs_embeds.repeat_interleave(num_beams, 0), attention_mask.repeat_interleave(num_beams, 0)
        loop = self._prefilled_loop(embeds, mask, max_new_tokens, min_new_tokens, settings, make_loop)
        for step in range(1, max_new_tokens):
            if step % self.sync_every == 0 and bool(loop.done):
                break
            loop.run_one()
        return loop.result()

    def _stream(self, loop: _DecodeLoop, batch: int, max_new_tokens: int, eos_token_id, pad_token_id, on_tokens) -> torch.Tensor:
        """Decode while handing each step's tokens to `on_tokens`. Step t + 1 is queued before the host reads
        step t's tokens, so on a GPU the host's per-token work (detokenizing, stop strings) overlaps the step;
        a row that `on_tokens` ends is told to the device one step late, and its extra token is cut afterwards
        (on a CPU the order is the same, so the CPU tests cover it)."""
        ended_at: dict[int, int] = {}  # row -> the step of its last token
        host = torch.empty((max_new_tokens, batch), dtype=torch.long, pin_memory=self.on_gpu)
        copied = [torch.cuda.Event() for _ in range(2)] if self.on_gpu else None

        def fetch(step: int) -> None:  # queue the copy of step's tokens behind the step itself
            host[step].copy_(loop.out[:batch, step], non_blocking=self.on_gpu)
            if copied:
                copied[step % 2].record()

        def hand_over(step: int) -> None:
            if copied:
                copied[step % 2].synchronize()
            tokens = [pad_token_id if row in ended_at else t for row, t in enumerate(host[step].tolist())]
            for row, token in enumerate(tokens):
                if token == eos_token_id and row not in ended_at:
                    ended_at[row] = step
            stopped = [row for row in on_tokens(tokens) if row not in ended_at]
            for row in stopped:
                ended_at[row] = step
            if stopped:
                loop.finished[stopped] = True  # from the next queued step on

        fetch(0)
        computed, handed = 1, 0  # steps queued on the device / handed to on_tokens
        while len(ended_at) < batch and handed < max_new_tokens:
            if computed < max_new_tokens and computed - handed <= 1:  # the device runs one step ahead
                loop.run_one()
                fetch(computed)
                computed += 1
            else:
                hand_over(handed)
                handed += 1
        out = loop.out[:batch, :max_new_tokens].clone()
        for row, step in ended_at.items():
            out[row, step + 1 :] = pad_token_id
        return out
