"""The generation loop: reuse the cached prefix, prefill the rest, then decode token by token.

Text comes out as a stream of pieces that never split a UTF-8 character and never show a stop string.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from kilnlm.runtime.cache import PREFILL_CHUNK, Cache
from kilnlm.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from kilnlm.runtime.grammar import TokenConstraint
    from kilnlm.runtime.tokenizer import Tokenizer



@dataclass
class GenerationParams:
    """When to stop and how to choose tokens."""

    max_new_tokens: int = 256
    stop: Sequence[str] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False


@dataclass
class GenerationStats:
    """What one generate call did, for the CLI's diagnostics and for benchmarks."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "eos", "stop", "length" (max tokens or context full) or "cancelled"
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode speed (tokens after the first, which comes out of prefill)."""
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens run per second (reused tokens excluded)."""
        ran = self.prompt_tokens - self.reused_tokens
        return ran / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class StopStringFilter:
    """Holds back text that might be the start of a stop string; reports when one is complete."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what is now safe to show."""
        self.text += piece
        if not self.stops:
            return self._emit(len(self.text))
        search_from = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.text) - self._partial_stop_suffix())

    def flush(self) -> str:
        """The held-back text, once generation has ended without completing a stop string."""
        return "" if self.stopped else self._emit(len(self.text))

    def _partial_stop_suffix(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted : end], end
        return piece


class Generator:
    """Runs one model over one cache: prefix reuse, chunked prefill, sampling loop, streaming text."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, cache: Cache, *, cancel: threading.Event | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.cancel = cancel or threading.Event()  # set from another thread: stop at the next chunk or step
        self.stats = GenerationStats()

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int], params: GenerationParams,
               constraint: TokenConstraint | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece (only what `constraint`'s grammar allows, if given);
        self.stats describes the run when the iterator ends."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids))
        started = time.perf_counter()
        logits = self._prefill(list(prompt_ids))
        stats.prefill_seconds = time.perf_counter() - started
        if logits is None:  # cancelled between prefill chunks
            stats.finish_reason = "cancelled"
            return
        self.cache.checkpoint()  # the next turn's prompt starts with this one (recurrent layers resume here)
        try:
            yield from self._decode(logits, prompt_ids, params, constraint)
        finally:
            self.cache.checkpoint()  # ... or with this answer

    def _decode(self, logits: torch.Tensor, prompt_ids: Sequence[int], params: GenerationParams,
                constraint: TokenConstraint | None) -> Iterator[str]:
        """Sample from `logits`, run each token, and yield the text as it becomes safe to show."""
        stats = self.stats
        sampler = Sampler(params.sampling, device=logits.device)
        penalise = params.sampling.repetition_penalty != 1.0
        history = torch.tensor(list(prompt_ids), dtype=torch.long, device=logits.device) if penalise else None
        detok, stops = self.tokenizer.stream(), StopStringFilter(params.stop)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_ids)
        decode_started = time.perf_counter()
        stats.finish_reason = "cancelled"  # replaced below unless the consumer abandons the stream
        while not self.cancel.is_set():
            token = sampler(constraint.mask(logits) if constraint else logits, history)
            if token in eos:
                stats.finish_reason = "eos"
                break
            if constraint:
                constraint.advance(token)
            stats.generated_tokens += 1
            stats.token_ids.append(token)
            piece = stops.feed(detok.push(token))
            if piece:
                yield piece
            if stops.stopped or (constraint and constraint.finished):
                stats.finish_reason = "stop"
                break
            if stats.generated_tokens >= params.max_new_tokens or self.cache.length >= self.cache.capacity:
                stats.finish_reason = "length"
                break
            if penalise:
                history = torch.cat([history, history.new_tensor([token])])
            logits = self.model(torch.tensor([[token]], device=logits.device), self.cache)[0, -1]
            stats.decode_seconds = time.perf_counter() - decode_started
        if not stops.stopped:
            tail = stops.feed(detok.flush()) + stops.flush()
            if tail:
                yield tail
        stats.decode_seconds = time.perf_counter() - decode_started

    def _prefill(self, prompt_ids: list[int]) -> torch.Tensor | None:
        """Run the prompt tokens the cache does not already hold; return the last position's logits (V,), or None
        when cancelled between chunks."""
        reused = self.cache.reuse_prefix(prompt_ids)
        self.cache.check_room(len(prompt_ids) - reused)  # fail before running anything, not halfway
        self.stats.reused_tokens = reused
        device = next(self.model.parameters()).device
        pending = torch.tensor(prompt_ids[reused:], dtype=torch.long, device=device)[None]
        logits = None
        for chunk in pending.split(PREFILL_CHUNK, dim=1):
            if self.cancel.is_set():
                return None
            logits = self.model(chunk, self.cache, last_logits_only=True)
        return logits[0, -1]
