"""Continuous batching: requests join and leave one running batch between decode steps, over the paged KV cache.

One worker thread owns the model. Each loop turn it
1. admits waiting requests while fewer than `parallel` run: each gets a sequence of the shared page pool,
   and takes the cached pages of any prefix it shares with earlier requests (system prompts, earlier turns);
2. runs up to one chunk (512 tokens) of prompt tokens, over as many waiting prompts as fit, so a long
   prompt delays the running streams by one chunk at a time, and many short ones start together;
3. samples the next token of every request whose logits are ready (each with its own seeded sampler, stop
   strings and detokenizer), finishes the ones that end, and runs all the others one decode step together
   as one PagedBatch forward pass (rows at different lengths).
A request's cancel flag is checked every turn; a finished request gives its pages back to the pool, where
the full ones stay findable by hash until the pool needs them.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kilnlm.runtime.cache import PREFILL_CHUNK
from kilnlm.runtime.generate import GenerationParams, GenerationStats, StopStringFilter
from kilnlm.runtime.grammar import GrammarError, TokenConstraint
from kilnlm.runtime.paged_cache import DEFAULT_PAGE, KVPagePool, PagedBatch, PagedKVCache
from kilnlm.runtime.sampling import Sampler

_END = object()  # the last item of a request's output queue


@dataclass
class _Request:
    """One generation in the batch: its prompt, its own sampling state, its output queue."""

    ids: list[int]
    params: GenerationParams
    cancel: threading.Event
    on_finish: Callable[[GenerationStats], None]
    out: queue.Queue = field(default_factory=queue.Queue)
    cache: PagedKVCache | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not run yet
    logits: torch.Tensor | None = None  # (V,) for the next token, once the prompt (or last token) has run
    stats: GenerationStats = field(default_factory=GenerationStats)
    sampler: Sampler | None = None
    history: torch.Tensor | None = None
    detok: object = None
    stops: StopStringFilter | None = None
    constraint: TokenConstraint | None = None  # the grammar the answer must follow, if any


class BatchScheduler:
    """Runs many generations of one model at once on a shared page pool (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, *, parallel: int, capacity: int, kv_options: dict | None = None):
        options = {k: v for k, v in (kv_options or {}).items() if k in ("k_type", "v_type", "rotate")}
        weight = next(model.parameters())
        pages = math.ceil(capacity / DEFAULT_PAGE) * parallel
        self.pool = KVPagePool(model.config, pages, dtype=weight.dtype, device=weight.device, **options)
        self.model, self.tokenizer = model, tokenizer
        self.parallel, self.capacity = parallel, capacity
        self.device = weight.device
        self.eos = frozenset(tokenizer.eos_ids)
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._active: list[_Request] = []
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="kilnlm-batch", daemon=True)
        self._thread.start()

    def stream(self, ids: Sequence[int], params: GenerationParams, cancel: threading.Event,
               on_finish: Callable[[GenerationStats], None],
               constraint: TokenConstraint | None = None) -> Iterator[str]:
        """Queue a generation; yield its text pieces as the batch produces them."""
        request = _Request(list(ids), params, cancel, on_finish, constraint=constraint)
        self._waiting.put(request)
        try:
            while (item := request.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # a consumer that stops early: the request leaves the batch at the next turn

    def close(self) -> None:
        """Stop the worker once the running requests have ended (waiting ones are cancelled)."""
        self._closing = True
        self._waiting.put(None)
        self._thread.join(timeout=60)

    def running(self) -> list[threading.Event]:
        """The cancel flags of the requests in the batch now."""
        return [request.cancel for request in list(self._active)]

    # ------------------------------------------------------------------------------------------ worker

    @torch.inference_mode()
    def _loop(self) -> None:
        while not (self._closing and not self._active):
            self._admit(block=not self._active)
            try:
                self._turn()
            except Exception as err:  # a failed pass ends every request in it, with the error
                for request in list(self._active):
                    self._finish(request, "error", err)

    def _admit(self, block: bool) -> None:
        while len(self._active) < self.parallel:
            try:
                request = self._waiting.get(block=block and not self._active)
            except queue.Empty:
                return
            if request is None or self._closing:  # close(): no new work
                if request is not None:
                    self._finish(request, "cancelled", active=False)
                return
            request.cache = PagedKVCache(self.pool, self.capacity)
            try:
                request.cache.check_room(len(request.ids))
            except Exception as err:
                self._finish(request, "error", err, active=False)
                continue
            reused = request.cache.reuse_prefix(request.ids)
            request.pending = request.ids[reused:]
            request.stats = GenerationStats(prompt_tokens=len(request.ids), reused_tokens=reused)
            request.sampler = Sampler(request.params.sampling, device=self.device)
            if request.params.sampling.repetition_penalty != 1.0:
                request.history = torch.tensor(request.ids, dtype=torch.long, device=self.device)
            request.detok, request.stops = self.tokenizer.stream(), StopStringFilter(request.params.stop)
            self._active.append(request)

    def _turn(self) -> None:
        for request in [r for r in self._active if r.cancel.is_set()]:
            self._finish(request, "cancelled")
        budget = PREFILL_CHUNK  # prompt tokens run per turn, over as many waiting prompts as fit
        for prefilling in [r for r in self._active if r.pending]:
            if budget <= 0:
                break
            chunk, prefilling.pending = prefilling.pending[:budget], prefilling.pending[budget:]
            budget -= len(chunk)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            logits = self.model(ids, prefilling.cache, last_logits_only=True)
            if not prefilling.pending:
                prefilling.logits = logits[0, -1]
        stepping = [r for r in self._active if r.logits is not None and self._sample(r)]
        if stepping:
            ids = torch.tensor([[r.stats.token_ids[-1]] for r in stepping], dtype=torch.long, device=self.device)
            logits = self.model(ids, PagedBatch([r.cache for r in stepping]))[:, -1]
            for request, row in zip(stepping, logits, strict=True):
                request.logits = row

    def _sample(self, request: _Request) -> bool:
        """Choose the request's next token and emit its text; False when the request has finished."""
        try:
            return self._choose(request)
        except GrammarError as err:  # this request's grammar failed: it ends alone, the batch goes on
            self._finish(request, "error", err)
            return False

    def _choose(self, request: _Request) -> bool:
        params, stats = request.params, request.stats
        constraint = request.constraint
        token = request.sampler(constraint.mask(request.logits) if constraint else request.logits, request.history)
        request.logits = None
        if token in self.eos and not params.ignore_eos:
            self._finish(request, "eos")
            return False
        if constraint:
            constraint.advance(token)
        stats.generated_tokens += 1
        stats.token_ids.append(token)
        piece = request.stops.feed(request.detok.push(token))
        if piece:
            request.out.put(piece)
        if request.stops.stopped or (constraint and constraint.finished):
            self._finish(request, "stop")
            return False
        if stats.generated_tokens >= params.max_new_tokens or request.cache.length + 1 >= request.cache.capacity:
            self._finish(request, "length")
            return False
        if request.history is not None:
            request.history = torch.cat([request.history, request.history.new_tensor([token])])
        return True

    def _finish(self, request: _Request, reason: str, error: BaseException | None = None, active: bool = True) -> None:
        request.stats.finish_reason = reason
        if reason not in ("stop", "error", "cancelled"):
            tail = request.stops.feed(request.detok.flush()) + request.stops.flush()
            if tail:
                request.out.put(tail)
        if error is not None:
            request.out.put(error)
        request.out.put(_END)
        if active:
            self._active.remove(request)
        if request.cache is not None:
            request.cache.reset()  # pages back to the pool; full ones stay findable by their prefix hash
        request.on_finish(request.stats)
