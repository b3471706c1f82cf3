"""Perplexity by llama.cpp's protocol: chunking, BOS, scored positions, the +/- formula, a peer and the CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_model
from kilnlm.errors import ContextLengthError, KilnError
from kilnlm.runtime.engine import Engine
from kilnlm.runtime.perplexity import PerplexityError, perplexity

KILN = [sys.executable, "-m", "kilnlm.cli"]
BOS = 1
STORY = ("Once upon a time there was a little {w} who liked to {v} in the {p}. The {w} would {v} "
         "every day, and {n} friends came to watch.\n")


class IdTokenizer:
    """Text is space-separated token ids; BOS first when add_bos, like the real tokenizer's encode."""

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos
        self.bos_id = BOS

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = [int(t) for t in text.split()]
        return [self.bos_id, *ids] if (self.add_bos if add_bos is None else add_bos) else ids


class BigramModel(nn.Module):
    """logits[b, t] = table[input_ids[b, t]] + position_bias[t]; records every input it is given."""

    def __init__(self, table: torch.Tensor, position_bias: torch.Tensor | None = None, max_positions: int = 1024):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)  # (V, V)
        self.position_bias = position_bias  # (max_positions, V) or None
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        assert cache is None
        self.inputs.append(input_ids.clone())
        logits = self.table[input_ids]  # (B, T, V)
        if self.position_bias is not None:
            logits = logits + self.position_bias[: input_ids.shape[1]]
        return logits


def _random_bigram(vocab: int, positions: int, seed: int = 0) -> BigramModel:
    gen = torch.Generator().manual_seed(seed)
    return BigramModel(torch.randn(vocab, vocab, generator=gen) * 2,
                       torch.randn(positions, vocab, generator=gen), max_positions=positions)


def _id_text(n: int, vocab: int, seed: int = 1) -> tuple[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n,), generator=gen).tolist()
    return " ".join(map(str, ids)), ids


def _scored_nlls(model: BigramModel, tokens: list[int], ctx: int, n_chunk: int, bos: int | None) -> list[float]:
    """The NLLs llama.cpp scores, written out position by position (float64, no shortcuts)."""
    nlls = []
    for c in range(n_chunk):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        inputs = ([bos] if bos is not None else chunk[:1]) + chunk[1:]
        for t in range(ctx // 2, ctx - 1):
            row = (model.table[inputs[t]] + model.position_bias[t]).double()
            nlls.append(-(row[chunk[t + 1]] - torch.logsumexp(row, 0)).item())
    return nlls


def _llama_cpp_estimate(nlls: list[float]) -> tuple[float, float]:
    n = len(nlls)
    mean = sum(nlls) / n
    var = sum(v * v for v in nlls) / n - mean * mean
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(var / (n - 1))


# ------------------------------------------------------------------------------------ protocol, exact


def test_known_numbers_give_ppl_4_plus_minus_4_ln2():
    # ctx 4: first = 2, one scored position per chunk (logits at 2 predict token 3). Two chunks:
    # chunk 0 = [BOS, 3, 4, 5]: p(5 | 4) = 7 / (7 + 7) = 1/2; chunk 1 = [6, 7, 2, 3]: p(3 | 2) = 1/8 (uniform).
    table = torch.zeros(8, 8)
    table[4, 5] = math.log(7)
    model = BigramModel(table)
    result = perplexity(model, IdTokenizer(), "3 4 5 6 7 2 3", ctx=4)
    # nll = ln 2 and ln 8: mean 2 ln 2 -> PPL 4; 1/N variance (ln 2)^2, / (N - 1) = 1 -> +/- 4 ln 2.
    assert result.tokens_scored == 2 and result.chunks == 2 and result.ctx == 4
    assert result.nll_mean == pytest.approx(2 * math.log(2), rel=1e-6)
    assert result.ppl == pytest.approx(4.0, rel=1e-6)
    assert result.stderr == pytest.approx(4 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_scores_the_second_half_of_each_chunk_with_bos_replacing_its_first_token(add_bos, batch):
    vocab, ctx = 11, 10
    model = _random_bigram(vocab, ctx)
    text, ids = _id_text(5 * ctx + 7, vocab)  # a ragged tail that must be dropped
    tokens = [BOS, *ids] if add_bos else ids
    seen = []
    result = perplexity(model, IdTokenizer(add_bos), text, ctx=ctx, batch=batch,
                        on_chunk=lambda i, n, p: seen.append((i, n, p)))

    n_chunk = len(tokens) // ctx
    expected = _scored_nlls(model, tokens, ctx, n_chunk, BOS if add_bos else None)
    ppl, stderr = _llama_cpp_estimate(expected)
    assert result.chunks == n_chunk == 5
    assert result.tokens_scored == len(expected) == n_chunk * (ctx - ctx // 2 - 1)
    assert result.ppl == pytest.approx(ppl, rel=1e-6)
    assert result.stderr == pytest.approx(stderr, rel=1e-6)

    # What the model saw: every chunk whole, from position 0, BOS in front only when the tokenizer adds one.
    fed = torch.cat(model.inputs)
    assert [len(x) for x in model.inputs] == [min(batch, n_chunk - s) for s in range(0, n_chunk, batch)]
    for c in range(n_chunk):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        assert fed[c].tolist() == ([BOS] if add_bos else chunk[:1]) + chunk[1:]
    # Progress after every chunk, in order, with the running PPL of the chunks so far.
    per_chunk = ctx - ctx // 2 - 1
    assert [(i, n) for i, n, _ in seen] == [(i, n_chunk) for i in range(1, n_chunk + 1)]
    for i, _, running in seen:
        assert running == pytest.approx(math.exp(sum(expected[:i * per_chunk]) / (i * per_chunk)), rel=1e-6)


def test_chunks_caps_the_number_of_chunks():
    vocab, ctx = 11, 8
    model = _random_bigram(vocab, ctx)
    text, ids = _id_text(6 * ctx, vocab)
    capped = perplexity(model, IdTokenizer(), text, ctx=ctx, chunks=2)
    assert capped.chunks == 2 and capped.tokens_scored == 2 * (ctx - ctx // 2 - 1)
    assert sum(len(x) for x in model.inputs) == 2
    expected, _ = _llama_cpp_estimate(_scored_nlls(model, [BOS, *ids], ctx, 2, BOS))
    assert capped.ppl == pytest.approx(expected, rel=1e-6)
    # More chunks than the text holds: all of them (6 * ctx + BOS tokens -> 6).
    assert perplexity(model, IdTokenizer(), text, ctx=ctx, chunks=100).chunks == 6


def test_text_shorter_than_two_contexts_is_an_error_that_names_the_count():
    vocab, ctx = 11, 8
    model = _random_bigram(vocab, ctx)
    short, _ = _id_text(2 * ctx - 2, vocab)  # + BOS = 2 * ctx - 1 tokens
    with pytest.raises(PerplexityError, match=rf"has {2 * ctx - 1} tokens.*at least {2 * ctx}"):
        perplexity(model, IdTokenizer(), short, ctx=ctx)
    just_enough, _ = _id_text(2 * ctx - 1, vocab)
    assert perplexity(model, IdTokenizer(), just_enough, ctx=ctx).chunks == 2


def test_bad_settings_are_project_errors():
    model = _random_bigram(11, 8)
    text, _ = _id_text(100, 11)
    with pytest.raises(ContextLengthError, match="larger than the model's context of 8"):
        perplexity(model, IdTokenizer(), text, ctx=16)
    for kwargs in ({"ctx": 2}, {"chunks": 0}, {"batch": 0}):
        with pytest.raises(KilnError):
            perplexity(model, IdTokenizer(), text, **{"ctx": 8, **kwargs})


# ------------------------------------------------------------------------------------ a peer: transformers


def _story_text(lines: int) -> str:
    words = [(w, v, p, n) for w in ("cat", "dog", "bird", "fox") for v in ("play", "sing", "swim")
             for p in ("park", "garden", "river") for n in ("two", "three")]
    return "".join(STORY.format(w=w, v=v, p=p, n=n) for w, v, p, n in words[:lines])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, sp_tokenizer_files) -> Path:
    folder = tmp_path_factory.mktemp("ppl_model")
    make_hf_model(folder, "llama", vocab_size=TOKENIZER_VOCAB, max_position_embeddings=64)
    add_tokenizer(folder, sp_tokenizer_files)
    return folder


def test_matches_transformers_on_the_same_chunks(tiny_folder):
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    text, ctx = _story_text(12), 32
    engine = Engine.load(tiny_folder, progress=False)
    ours = perplexity(engine.model, engine.tokenizer, text, ctx=ctx, batch=2)

    # Independent: sentencepiece ids + BOS, HF's model, chunking and scoring written out here.
    tokens = [BOS, *spm.SentencePieceProcessor(model_file=str(tiny_folder / "tokenizer.model")).encode(text)]
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_folder).eval()
    n_chunk = len(tokens) // ctx
    chunks = torch.tensor(tokens[:n_chunk * ctx]).view(n_chunk, ctx)
    inputs = chunks.clone()
    inputs[:, 0] = BOS
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(inputs).logits.double(), -1)  # (n_chunk, ctx, V) in one call
    nlls = [-logprobs[c, t, chunks[c, t + 1]].item() for c in range(n_chunk) for t in range(ctx // 2, ctx - 1)]
    ppl, stderr = _llama_cpp_estimate(nlls)
    assert n_chunk >= 3 and ours.chunks == n_chunk and ours.tokens_scored == len(nlls)
    assert ours.ppl == pytest.approx(ppl, rel=1e-4)
    assert ours.stderr == pytest.approx(stderr, rel=1e-4)
    assert ours.ppl > 10  # a random model: sanity that the comparison is not between two constants


def test_divergence_from_a_base_model(tiny_folder):
    """KL(base || model) and the same-top-token rate on the scored positions, checked against a direct computation."""
    text, ctx = _story_text(12), 32
    base = Engine.load(tiny_folder, progress=False)
    same = perplexity(base.model, base.tokenizer, text, ctx=ctx, base=base.model).divergence
    assert same.kl_mean == pytest.approx(0, abs=1e-6) and same.same_top == 1.0

    model = Engine.load(tiny_folder, progress=False).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("proj.weight"):
                weight += 0.5 * weight.std() * torch.randn(weight.shape, generator=g)
    result = perplexity(model, base.tokenizer, text, ctx=ctx, batch=2, base=base.model)

    tokens = base.tokenizer.encode(text)
    n_chunk = len(tokens) // ctx
    inputs = torch.tensor(tokens[: n_chunk * ctx]).view(n_chunk, ctx)
    inputs[:, 0] = BOS
    with torch.no_grad():
        p, q = (torch.log_softmax(m(inputs)[:, ctx // 2 : ctx - 1].double(), -1) for m in (base.model, model))
    kl = (p.exp() * (p - q)).sum(-1)
    d = result.divergence
    assert d.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4) and d.kl_mean > 1e-3
    assert d.kl_stderr == pytest.approx(kl.std(unbiased=False).item() / math.sqrt(kl.numel() - 1), rel=1e-3)
    assert d.same_top == pytest.approx((p.argmax(-1) == q.argmax(-1)).double().mean().item())
    assert 0 < d.same_top < 1
    assert d.base_ppl == pytest.approx(perplexity(base.model, base.tokenizer, text, ctx=ctx).ppl, rel=1e-6)


# ------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_library_value_last(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(_story_text(12), encoding="utf-8")
    result = subprocess.run([*KILN, "perplexity", str(tiny_folder), "--text", str(text), "--ctx", "32",
                             "--chunks", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    match = re.fullmatch(r"ppl = (\d+\.\d{4}) \+/- (\d+\.\d{4})", lines[-1])
    assert match, result.stdout
    assert "3 chunks" in lines[-2] and "ctx 32" in lines[-2] and f"{3 * 15} tokens" in lines[-2]
    engine = Engine.load(tiny_folder, progress=False)
    expected = perplexity(engine.model, engine.tokenizer, _story_text(12), ctx=32, chunks=3)
    assert match.group(1) == f"{expected.ppl:.4f}" and match.group(2) == f"{expected.stderr:.4f}"
    assert "ppl=" in result.stderr  # the progress bar shows the running value


def test_cli_kl_base_reports_the_divergence_before_the_ppl_line(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(_story_text(12), encoding="utf-8")
    result = subprocess.run([*KILN, "perplexity", str(tiny_folder), "--text", str(text), "--ctx", "32",
                             "--chunks", "2", "--kl-base", str(tiny_folder)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("ppl = ")
    assert re.fullmatch(r"base ppl = \d+\.\d{4}; KL\(base \|\| model\) = 0\.000000 \+/- 0\.000000; "
                        r"same top token 100\.00%", lines[-2]), result.stdout


def test_cli_short_text_fails_cleanly_and_help_has_an_example(tiny_folder, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Once upon a time", encoding="utf-8")
    result = subprocess.run([*KILN, "perplexity", str(tiny_folder), "--text", str(text), "--ctx", "32"],
                            capture_output=True, text=True, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr
    assert last.startswith("kiln: error:") and re.search(r"has \d+ tokens.*needs at least 64", last)
    assert "Traceback" not in result.stderr
    shown = subprocess.run([*KILN, "perplexity", "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "examples:" in shown.stdout and "kiln perplexity " in shown.stdout


# ------------------------------------------------------------------------------------ a trained model


def test_stories260k_on_tinystories_text_has_a_low_perplexity(shared_dir):
    folder = shared_dir / "checkpoints/stories260K-hf"
    text = (shared_dir / "text/calibration/tiny.txt").read_text(encoding="utf-8")
    engine = Engine.load(folder, progress=False)
    result = perplexity(engine.model, engine.tokenizer, text, ctx=256, chunks=4, batch=4)
    assert result.chunks == 4 and result.tokens_scored == 4 * 127
    # Measured 6.05 +/- 0.70 for these 4 chunks (7.42 over all 526); a random 512-token model scores ~512.
    assert 3 < result.ppl < 12 and 0 < result.stderr < 0.3 * result.ppl
