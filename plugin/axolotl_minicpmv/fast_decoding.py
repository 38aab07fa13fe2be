"""Decoding without a host synchronisation per token: static KV cache, one CUDA graph per step.

`generate()` checks its stopping criteria on the host after every token, and at batch 1 its per-step
Python work costs more than the GPU's. Here the decoder step runs as a CUDA graph (torch.compile,
mode "reduce-overhead", over a transformers `StaticCache`), the next token is chosen on the device,
and the host reads the end-of-sequence flags only every `sync_every` tokens.

Greedy decoding emits the tokens of `generate(num_beams=1, do_sample=False)` (checked on the GPU by
benchmarks/check_fast_decode.py); sampling draws from the same distribution (repetition penalty over
generated tokens, temperature, top-k, top-p, in generate's order) with its own random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import StaticCache


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


def choose_tokens(logits: torch.Tensor, seen: torch.Tensor | None, sampling: Sampling, generator=None) -> torch.Tensor:
    """(batch, vocab) float logits -> (batch,) token ids, without reading anything back to the host."""
    if seen is not None:  # generate's RepetitionPenaltyLogitsProcessor, over the tokens generated so far
        penalty = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if not sampling.do_sample:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    top_k = min(sampling.top_k, logits.shape[-1]) if sampling.top_k else logits.shape[-1]
    values, indices = logits.topk(top_k)  # sorted, highest first
    if sampling.top_p < 1:
        probs = values.softmax(-1)
        # Keep a token while the tokens ranked above it hold less than top_p of the mass (the first always).
        values = values.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, float("-inf"))
    probs = values.softmax(-1)
    # Exponential race (Gumbel-max): argmax of p / Exp(1) is a draw from p, with no host synchronisation.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return indices.gather(-1, (probs / noise).argmax(-1, keepdim=True)).squeeze(-1)


def _decode_step(llm, cache: StaticCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return llm(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


class FastDecoder:
    """Greedy or sampled decoding for `MiniCPMV` from prompt embeddings (see `MiniCPMV.embed_inputs`).

    One `StaticCache` is kept, sized to the next power of two (at least 256) of prompt + new tokens, so a
    handful of graphs serve every request; a new size or batch size compiles once more (tens of seconds).
    On CPU the same loop runs eagerly.
    """

    def __init__(self, model, sync_every: int = 16):
        self.model = model
        self.sync_every = sync_every
        on_gpu = model.device.type == "cuda"
        self._step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True) if on_gpu else _decode_step
        self._cache: StaticCache | None = None
        self._cache_key: tuple[int, int] | None = None

    def _fresh_cache(self, batch: int, length: int) -> StaticCache:
        cache_len = max(256, 1 << (length - 1).bit_length())
        if self._cache_key != (batch, cache_len):
            self._cache = None  # free the old one first: 40 layers of keys and values
            self._cache = StaticCache(config=self.model.config, max_cache_len=cache_len)
            self._cache_key = (batch, cache_len)
        self._cache.reset()
        return self._cache

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        min_new_tokens: int = 0,
        sampling: Sampling = Sampling(),
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """New token ids (batch, n <= max_new_tokens) for equal-length prompts; after its eos a row holds pad ids."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        llm = self.model.llm
        batch, prompt_len, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache = self._fresh_cache(batch, prompt_len + max_new_tokens)
        logits = llm(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

        out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        positions = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if eos_token_id is not None and step < min_new_tokens:
                logits = logits.index_fill(-1, torch.tensor([eos_token_id], device=device), float("-inf"))
            tokens = choose_tokens(logits, seen, sampling, generator)
            if eos_token_id is not None:
                tokens = tokens.masked_fill(finished, pad_token_id)
                finished |= tokens == eos_token_id
            out[:, step] = tokens
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if step + 1 == max_new_tokens:
                break
            if eos_token_id is not None and (step + 1) % self.sync_every == 0 and bool(finished.all()):
                break
            torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(llm, cache, tokens[:, None], positions)
            positions += 1
        if eos_token_id is None:
            return out
        # Like generate: stop after the column where the last row finished.
        ended = (out == eos_token_id).cumsum(-1) > 0
        still_running = (~ended).sum(-1)  # tokens before each row's eos
        length = int(torch.minimum(still_running + 1, torch.tensor(max_new_tokens, device=device)).max())
        return out[:, :length]
