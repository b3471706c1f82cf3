"""The small trained Mamba-2 checkpoint (tests/data/mamba2-shakespeare, see its TRAINING.md): real weights for
parity with transformers, quantization quality and the second chat turn's prefix reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kilnlm import Engine
from kilnlm.export.gguf import write_gguf
from kilnlm.export.hf import open_hf_checkpoint
from kilnlm.runtime.perplexity import perplexity

TRAINED = Path(__file__).resolve().parent / "data" / "mamba2-shakespeare"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(TRAINED, progress=False)


def test_greedy_continuation_equals_transformers(engine):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(TRAINED, dtype=torch.float32).eval()
    prompt = engine.tokenizer.encode("ROMEO:\n", add_bos=True)
    engine.reset()
    engine.generate(prompt, max_tokens=48, temperature=0, ignore_eos=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, min_new_tokens=48,
                               do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()
    assert engine.last_stats.token_ids == expected


def test_second_turn_runs_only_the_new_tokens_and_answers_as_a_fresh_engine(engine):
    engine.reset()
    messages = [{"role": "user", "content": "ROMEO: What light through yonder window breaks?"}]
    answer = engine.chat(messages, max_tokens=40, temperature=0)
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "JULIET: Ay me! Speak again, bright angel."}]
    second = engine.chat(messages, max_tokens=40, temperature=0)
    stats = engine.last_stats
    # The first turn's prompt (at least) is restored from a checkpoint; only the rest is run.
    assert stats.reused_tokens >= len(engine.chat_prompt_ids(messages[:1]))
    fresh = Engine.load(TRAINED, progress=False)
    assert fresh.chat(messages, max_tokens=40, temperature=0) == second
    assert fresh.last_stats.reused_tokens == 0


def test_held_out_perplexity_and_q8_0(engine, shared_dir, tmp_path):
    text = (shared_dir / "text/tinyshakespeare.txt").read_text(encoding="utf-8")[-40_000:]  # in the held-out 5%
    base = perplexity(engine.model, engine.tokenizer, text, ctx=256, chunks=8, batch=4)
    # An untrained 1024-piece model scores ~1024; this one measured ~29 over the whole held-out split.
    assert 10 < base.ppl < 60
    out = tmp_path / "q8_0.gguf"
    write_gguf(open_hf_checkpoint(TRAINED), out, "q8_0")
    quantized = Engine.load(out, progress=False)
    q8 = perplexity(quantized.model, quantized.tokenizer, text, ctx=256, chunks=8, batch=4)
    assert abs(q8.ppl / base.ppl - 1) < 0.01
