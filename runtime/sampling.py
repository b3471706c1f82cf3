"""Token sampling: logits processors with transformers' generate() semantics, and a seeded Sampler.

Order, as in generate(): repetition penalty, then greedy argmax when temperature is 0, else temperature,
top-k, top-p, min-p, and a draw from the remaining distribution with the Sampler's own torch.Generator.
Each processor takes a (vocab,) float32 tensor and returns a new one, filtered tokens set to -inf.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from kilnlm.errors import KilnError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; temperature 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # None = a fresh random seed per Sampler

    def __post_init__(self) -> None:
        # `not (x >= 0)` rather than `x < 0` so that NaN is refused too
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise KilnError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise KilnError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise KilnError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise KilnError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise KilnError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise KilnError(f"seed must be an int or None, got {self.seed!r}")


class Sampler:
    """Chooses tokens from logits under SamplingParams with its own seeded torch.Generator (no global RNG)."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        # Without a seed, draw one from the OS so two samplers never share a stream; keep it so a run can be replayed.
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.device = _resolve(torch.device(device))
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor, previous_ids: torch.Tensor | None = None) -> int:
        """Return the next token id for (vocab,) logits, given the prompt+generated ids so far."""
        if logits.dim() != 1:
            raise ValueError(f"logits must have shape (vocab,), got {tuple(logits.shape)}")
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device} but this Sampler was made for {self.device}")
        p = self.params
        scores = logits.float()
        if p.repetition_penalty != 1.0 and previous_ids is not None:
            scores = apply_repetition_penalty(scores, previous_ids, p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(scores))  # torch.argmax returns the first (lowest) index among ties
        probs = torch.softmax(_warp(scores, p), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def _warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p, in generate()'s order, skipping the ones that are off."""
    scores = scores / params.temperature
    if params.top_k > 0:
        scores = apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p)
    if params.min_p > 0.0:
        scores = apply_min_p(scores, params.min_p)
    return scores


def _resolve(device: torch.device) -> torch.device:
    """Give a bare "cuda" its current index, so it compares equal to the device tensors report."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def apply_repetition_penalty(scores: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token in previous_ids less likely (penalty > 1): negative logits * penalty, others / penalty."""
    ids = previous_ids.to(device=scores.device, dtype=torch.long).flatten()
    # Ids past the logits' vocab (embedding tables padded beyond the lm_head) can never be sampled: skip them.
    ids = ids[ids < scores.shape[-1]]
    seen = scores.gather(-1, ids)
    # Each id is penalised once however often it occurs: repeated ids scatter the same value.
    return scores.scatter(-1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores (plus any tied with the k-th), set the rest to -inf."""
    kth_best = torch.topk(scores, min(k, scores.shape[-1])).values[-1]
    return scores.masked_fill(scores < kth_best, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= top_p (at least one token)."""
    ascending, order = torch.sort(scores)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    # Drop the unlikely tail whose total mass is within 1 - top_p; the most likely token is always kept.
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[-1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    probs = torch.softmax(scores, dim=-1)
    # min_p <= 1, so the most likely token always passes and at least one token is kept.
    drop = probs < min_p * probs.max()
    return scores.masked_fill(drop, -math.inf)
