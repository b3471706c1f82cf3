"""Generation loop, stop strings, KV-cache reuse across chat turns, context limits, and the Engine API."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_model
from kilnlm.errors import ContextLengthError, KilnError
from kilnlm.runtime.cache import DenseKVCache
from kilnlm.runtime.engine import Engine
from kilnlm.runtime.generate import StopStringFilter


def _feed_all(stops, pieces):
    filt = StopStringFilter(stops)
    out = [filt.feed(p) for p in pieces]
    return "".join(out) + filt.flush(), filt.stopped, out


def test_stop_string_split_over_pieces_is_never_shown():
    text, stopped, out = _feed_all(["END"], ["hello E", "N", "D and more"])
    assert (text, stopped) == ("hello ", True)
    assert out[0] == "hello "  # "E" is held back as a possible start of "END"


def test_held_back_text_is_released_when_no_stop_follows():
    text, stopped, out = _feed_all(["END"], ["abc E", "x", "yz"])
    assert (text, stopped) == ("abc Exyz", False)
    assert out == ["abc ", "Ex", "yz"]


def test_earliest_of_several_stop_strings_wins():
    text, stopped, _ = _feed_all(["\n\n", "User:"], ["answer. User: hi\n\nmore"])
    assert (text, stopped) == ("answer. ", True)


def test_cache_prefix_reuse_and_truncate():
    cache = DenseKVCache(num_layers=1, num_kv_heads=1, head_dim=2, capacity=8)
    cache.commit([1, 2, 3, 4])
    assert cache.reuse_prefix([1, 2, 9, 9]) == 2 and cache.token_ids == [1, 2]
    cache.commit([9, 9])
    # A prompt equal to the cached tokens still leaves its last token to run (its logits are needed).
    assert cache.reuse_prefix([1, 2, 9, 9]) == 3
    with pytest.raises(ContextLengthError, match="do not fit the context of 8 tokens"):
        cache.check_room(6)


@pytest.fixture
def engine_folder(tmp_path, sp_tokenizer_files):
    make_hf_model(tmp_path, "llama", vocab_size=TOKENIZER_VOCAB, max_position_embeddings=256)
    add_tokenizer(tmp_path, sp_tokenizer_files)
    return tmp_path


@pytest.fixture
def wide_head_folder(tmp_path, sp_tokenizer_files):
    """The tiny model with head_dim 32, so that q8_0 / q4_0 KV blocks fit."""
    make_hf_model(tmp_path, "llama", vocab_size=TOKENIZER_VOCAB, max_position_embeddings=256, head_dim=32)
    add_tokenizer(tmp_path, sp_tokenizer_files)
    return tmp_path


def test_engine_greedy_matches_plain_forward_loop(engine_folder):
    engine = Engine.load(engine_folder, progress=False)
    prompt_ids = engine.tokenizer.encode("Once upon a time")
    text = engine.generate("Once upon a time", max_tokens=12, temperature=0, ignore_eos=True)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(engine.model(torch.tensor([ids]))[0, -1].argmax()))
    assert engine.last_stats.token_ids == ids[len(prompt_ids):]
    assert text == engine.tokenizer.decode(ids[len(prompt_ids):])
    assert engine.last_stats.finish_reason == "length"


def test_stream_concatenates_to_the_text(engine_folder):
    engine = Engine.load(engine_folder, progress=False)
    pieces = list(engine.generate("the dog", max_tokens=15, temperature=1.0, seed=3, stream=True))
    again = engine.generate("the dog", max_tokens=15, temperature=1.0, seed=3)
    assert "".join(pieces) == again and len(pieces) > 1


def test_seeded_sampling_is_reproducible_and_seed_sensitive(engine_folder):
    engine = Engine.load(engine_folder, progress=False)
    runs = [engine.generate("a", max_tokens=20, temperature=1.5, seed=s, ignore_eos=True) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("kv", [{}, {"kv_type": "q8_0"}, {"k_type": "q8_0", "v_type": "q4_0"},
                                {"kv_type": "q4_0", "kv_rotation": False}, {"paged_kv": True},
                                {"paged_kv": True, "kv_type": "q8_0"}])
def test_chat_turns_reuse_the_cache_and_match_a_fresh_run(wide_head_folder, kv):
    """Per cache kind: the second turn runs only its new tokens and answers as a fresh engine of that kind."""
    engine_folder = wide_head_folder
    engine = Engine.load(engine_folder, progress=False, **kv)
    messages = [{"role": "user", "content": "Once upon a time"}]
    first = engine.chat(messages, max_tokens=8, temperature=0)
    cached = list(engine.cache.token_ids)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "the cat"}]
    second = engine.chat(messages, max_tokens=8, temperature=0)
    stats = engine.last_stats
    # Everything the new prompt shares with the cache (at least the whole first prompt) is not run again.
    new_prompt = engine.chat_prompt_ids(messages)
    assert stats.reused_tokens == _common_prefix(cached, new_prompt)
    assert stats.reused_tokens >= len(engine.chat_prompt_ids(messages[:1])) > 0
    fresh = Engine.load(engine_folder, progress=False, **kv)
    assert fresh.chat(messages, max_tokens=8, temperature=0) == second
    assert fresh.last_stats.reused_tokens == 0


def test_prompt_extending_the_previous_one_runs_only_the_new_tokens(engine_folder):
    engine = Engine.load(engine_folder, progress=False)
    engine.generate("Once upon a time", max_tokens=6, temperature=0, ignore_eos=True)
    held = list(engine.cache.token_ids)  # prompt + generated tokens (all but the last sampled one)
    extended = held + engine.tokenizer.encode(" the dog", add_bos=False)
    with_reuse = engine.generate(extended, max_tokens=6, temperature=0, ignore_eos=True)
    assert engine.last_stats.reused_tokens == len(held)
    assert with_reuse == Engine.load(engine_folder, progress=False).generate(
        extended, max_tokens=6, temperature=0, ignore_eos=True)


def test_prompt_longer_than_context_is_refused_before_running(engine_folder):
    engine = Engine.load(engine_folder, progress=False, context_length=16)
    with pytest.raises(ContextLengthError, match="context of 16 tokens"):
        engine.generate("Once upon a time there was a little dog who liked to run in the park " * 3)
    assert engine.cache.length == 0


def test_generation_stops_when_the_context_is_full(engine_folder):
    engine = Engine.load(engine_folder, progress=False, context_length=12)
    engine.generate("the cat", max_tokens=100, temperature=0, ignore_eos=True)
    assert engine.last_stats.finish_reason == "length"
    assert engine.cache.length == 12


def test_bad_engine_options_are_project_errors(engine_folder):
    with pytest.raises(KilnError, match="unknown dtype"):
        Engine.load(engine_folder, dtype="float8", progress=False)
    with pytest.raises(KilnError, match="unknown device"):
        Engine.load(engine_folder, device="tpu9", progress=False)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from kilnlm.errors import TokenizerError

    make_hf_model(tmp_path, "llama")
    with pytest.raises(TokenizerError, match="tokenizer"):
        Engine.load(tmp_path, progress=False)
