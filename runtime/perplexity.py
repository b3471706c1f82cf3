"""Perplexity with the protocol of llama.cpp's `llama-perplexity`, so our numbers compare with its numbers.

    from kilnlm import Engine
    from kilnlm.runtime.perplexity import perplexity
    engine = Engine.load("model.gguf")
    result = perplexity(engine.model, engine.tokenizer, open("wiki.test.raw").read(), ctx=512)
    print(f"ppl = {result.ppl:.4f} +/- {result.stderr:.4f}")

The protocol (llama.cpp tools/perplexity/perplexity.cpp, `perplexity()`, the default path without
--ppl-stride):

1. Tokenize the whole text once, with BOS when the tokenizer adds one (`common_tokenize(..., add_special=true)`).
2. Cut the tokens into n_chunk = min(n_tokens // ctx, chunks) non-overlapping chunks of `ctx` tokens; the
   tail that does not fill a chunk is dropped. At least 2 * ctx tokens are required.
3. Each chunk runs as its own sequence from position 0. When the tokenizer adds BOS, the chunk's first
   *input* token is replaced by BOS (the targets keep the original tokens; position 0 is never a target).
4. Only the second half is scored: with first = ctx // 2, logits at positions first .. ctx-2 predict tokens
   first+1 .. ctx-1, i.e. ctx - first - 1 tokens per chunk.
5. Over all N scored tokens with nll_i = -log p(token_i), PPL = exp(mean nll) and the reported uncertainty
   is PPL * sqrt((mean(nll^2) - mean(nll)^2) / (N - 1)) (first-order error propagation of exp).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from kilnlm.errors import ContextLengthError, KilnError
from kilnlm.runtime.cache import PREFILL_CHUNK

if TYPE_CHECKING:
    from kilnlm.runtime.tokenizer import Tokenizer

DEFAULT_CTX = 512  # llama.cpp's customary perplexity context (wikitext-2 figures are quoted at 512)


class PerplexityError(KilnError):
    """The text or the settings cannot give a perplexity (too few tokens, bad chunk counts)."""


@dataclass
class DivergenceResult:
    """How far a model's next-token distributions are from a base model's on the same scored positions.

    These are the statistics of llama-perplexity's `--kl-divergence` mode: a steadier measure of quantization
    damage than a perplexity difference, which a perturbation can lower by chance (e.g. on text where the
    base model is overconfident, any noise that flattens its predictions lowers its perplexity).
    """

    kl_mean: float  # mean over scored tokens of KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v))
    kl_stderr: float  # standard error of that mean (1/N variance, as llama.cpp computes it)
    same_top: float  # fraction of scored positions where both models rank the same token first
    base_ppl: float  # the base model's perplexity on the same chunks


@dataclass
class PerplexityResult:
    """One perplexity run; `ppl` and `stderr` are what llama.cpp prints as `PPL = X +/- Y`."""

    ppl: float  # exp(nll_mean)
    stderr: float  # ppl * sqrt(var(nll) / (N - 1)), var with 1/N as llama.cpp computes it; nan when N < 2
    nll_mean: float  # mean negative log-likelihood per scored token, in nats
    tokens_scored: int  # N = chunks * (ctx - ctx // 2 - 1)
    chunks: int
    ctx: int
    seconds: float  # wall time of the whole call, tokenization included
    divergence: DivergenceResult | None = None  # against `base`, when one was given


def perplexity(
    model: nn.Module,
    tokenizer: Tokenizer,
    text: str,
    *,
    ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    batch: int = 1,
    on_chunk: Callable[[int, int, float], None] | None = None,
    base: nn.Module | None = None,
    kv_options: dict | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `text` by llama.cpp's protocol (see the module docstring).

    `model(input_ids (B, T), cache=None)` must return logits (B, T, V) and `model.config.max_position_embeddings`
    bounds `ctx`. `chunks` caps the number of chunks (None: all), `batch` is how many chunks share one forward
    pass, and `on_chunk(done, total, running_ppl)` is called after every chunk, in order. With a `base` model
    (same vocabulary; e.g. the F16 model a quantized one came from) the result also holds the divergence of
    `model` from `base` on the scored positions. With `kv_options` naming a cache type (k_type / v_type, see
    runtime.cache.new_kv_cache) `model` scores through a KV cache of that type, in sub-batches of at most
    PREFILL_CHUNK tokens, so attention reads the quantized keys and values as llama-perplexity's does.
    """
    started = time.perf_counter()
    _check_settings(model, ctx, chunks, batch)
    if base is not None:
        _check_settings(base, ctx, chunks, batch)
    tokens = tokenizer.encode(text)  # BOS first when the tokenizer adds one, as llama.cpp tokenizes
    if len(tokens) < 2 * ctx:
        raise PerplexityError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {ctx} needs at least {2 * ctx}"
        )
    n_chunk = len(tokens) // ctx if chunks is None else min(len(tokens) // ctx, chunks)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    ids = torch.tensor(tokens[: n_chunk * ctx], dtype=torch.long).view(n_chunk, ctx)  # (C, ctx)
    first = ctx // 2

    nll_sum = nll2_sum = 0.0
    count = 0
    divergence = _DivergenceSums() if base is not None else None
    for start in range(0, n_chunk, batch):
        targets = ids[start : start + batch]  # (b, ctx): the original tokens
        inputs = targets.clone()
        if bos_id is not None:
            inputs[:, 0] = bos_id
        logprobs = _scored_logprobs(model, inputs, first, kv_options)  # (b, ctx-1-first, V)
        scored = targets[:, first + 1 :].to(logprobs.device).unsqueeze(-1)
        nll = (-logprobs.gather(-1, scored).squeeze(-1)).double().cpu()  # (b, ctx-1-first)
        if divergence is not None:
            divergence.add(_scored_logprobs(base, inputs, first).to(logprobs.device), logprobs, scored)
        for k, row in enumerate(nll):  # chunk by chunk, so running values match llama.cpp's per-chunk print
            nll_sum += row.sum().item()
            nll2_sum += row.square().sum().item()
            count += row.numel()
            if on_chunk is not None:
                on_chunk(start + k + 1, n_chunk, math.exp(nll_sum / count))

    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = max(nll2_sum / count - mean * mean, 0.0)  # 1/N variance; rounding can make it a hair negative
    stderr = ppl * math.sqrt(variance / (count - 1)) if count > 1 else math.nan
    return PerplexityResult(
        ppl=ppl, stderr=stderr, nll_mean=mean, tokens_scored=count, chunks=n_chunk, ctx=ctx,
        seconds=time.perf_counter() - started, divergence=divergence.result() if divergence is not None else None,
    )


def _scored_logprobs(model: nn.Module, inputs: torch.Tensor, first: int, kv_options: dict | None = None) -> torch.Tensor:
    """float32 log-probabilities (b, ctx-1-first, V) at the positions whose next token is scored."""
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    with torch.inference_mode():
        if kv_options and (kv_options.get("k_type") or kv_options.get("v_type")):
            cache = model.new_cache(inputs.shape[1], batch=inputs.shape[0], **kv_options)
            logits = torch.cat([model(part, cache) for part in inputs.split(PREFILL_CHUNK, dim=1)], dim=1)
        else:
            logits = model(inputs, cache=None)  # (b, ctx, V)
        return torch.log_softmax(logits[:, first : inputs.shape[1] - 1].float(), dim=-1)


class _DivergenceSums:
    """Running sums for DivergenceResult over the scored positions of every chunk."""

    def __init__(self) -> None:
        self.kl_sum = self.kl2_sum = self.base_nll_sum = 0.0
        self.same = self.count = 0

    def add(self, base_logprobs: torch.Tensor, logprobs: torch.Tensor, scored: torch.Tensor) -> None:
        if base_logprobs.shape != logprobs.shape:
            raise PerplexityError(
                f"the base model predicts {base_logprobs.shape[-1]} tokens and the model {logprobs.shape[-1]}; "
                "a divergence needs the same vocabulary"
            )
        kl = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1).double()  # (b, positions)
        self.kl_sum += kl.sum().item()
        self.kl2_sum += kl.square().sum().item()
        self.base_nll_sum += -base_logprobs.gather(-1, scored).double().sum().item()
        self.same += int((base_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())
        self.count += kl.numel()

    def result(self) -> DivergenceResult:
        mean = self.kl_sum / self.count
        variance = max(self.kl2_sum / self.count - mean * mean, 0.0)
        stderr = math.sqrt(variance / (self.count - 1)) if self.count > 1 else math.nan
        return DivergenceResult(kl_mean=mean, kl_stderr=stderr, same_top=self.same / self.count,
                                base_ppl=math.exp(self.base_nll_sum / self.count))


def _check_settings(model: nn.Module, ctx: int, chunks: int | None, batch: int) -> None:
    if ctx < 4:
        raise PerplexityError(f"ctx must be at least 4 tokens (half of it is context, the rest is scored), got {ctx}")
    limit = model.config.max_position_embeddings
    if ctx > limit:
        raise ContextLengthError(f"ctx {ctx} is larger than the model's context of {limit} tokens")
    if chunks is not None and chunks < 1:
        raise PerplexityError(f"chunks must be at least 1 (or None for all), got {chunks}")
    if batch < 1:
        raise PerplexityError(f"batch must be at least 1, got {batch}")
