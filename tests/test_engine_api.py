"""The embedding contract of Engine: threads queue, cancel() from another thread, close(), asyncio streaming."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kilnlm import Engine
from kilnlm.runtime.engine import EngineClosedError, demo_model_path


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(demo_model_path(), progress=False)


def test_threads_queue_and_each_gets_its_own_stats(engine):
    expected = engine.generate("ROMEO:", max_tokens=12, temperature=0, ignore_eos=True)
    results, stats = {}, {}

    def run(i: int) -> None:
        results[i] = engine.generate("ROMEO:", max_tokens=12, temperature=0, ignore_eos=True,
                                     on_finish=lambda s, i=i: stats.__setitem__(i, s))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(results[i] == expected for i in range(3))
    assert all(stats[i].generated_tokens == 12 for i in range(3))


def test_cancel_from_another_thread_stops_the_running_generation(engine):
    pieces = engine.generate("ROMEO:", stream=True, max_tokens=2000, temperature=0, ignore_eos=True)
    first = next(pieces)
    threading.Timer(0.05, engine.cancel).start()
    rest = "".join(pieces)
    assert first and engine.last_stats.finish_reason == "cancelled"
    assert engine.last_stats.generated_tokens < 2000
    assert rest is not None
    # The next call is not affected by the earlier cancel.
    assert engine.generate("ROMEO:", max_tokens=5, temperature=0, ignore_eos=True)
    assert engine.last_stats.finish_reason == "length"


def test_astream_yields_the_same_text(engine):
    expected = engine.generate("JULIET:", max_tokens=10, temperature=0, ignore_eos=True)

    async def collect() -> str:
        return "".join([piece async for piece in engine.astream("JULIET:", max_tokens=10, temperature=0,
                                                                ignore_eos=True)])

    assert asyncio.run(collect()) == expected


def test_close_frees_the_model_and_refuses_later_calls():
    with Engine.load(demo_model_path(), progress=False) as engine:
        engine.generate("ROMEO:", max_tokens=2, temperature=0)
    assert engine.model is None
    with pytest.raises(EngineClosedError):
        engine.generate("ROMEO:", max_tokens=2)


# --------------------------------------------------------------------------------------------- continuous batching


def test_parallel_engine_batches_requests_and_matches_one_at_a_time():
    prompts = ["ROMEO:", "JULIET:", "First Citizen:\nBefore we proceed", "KING HENRY:"]
    single = Engine.load(demo_model_path(), progress=False, context_length=256)
    expected = [single.generate(p, max_tokens=20, temperature=0, ignore_eos=True) for p in prompts]
    sampled = single.generate("ROMEO:", max_tokens=20, temperature=0.9, seed=3, ignore_eos=True)
    with Engine.load(demo_model_path(), progress=False, context_length=256, parallel=3) as batched:
        results, stats = {}, {}

        def run(i: int) -> None:
            results[i] = batched.generate(prompts[i], max_tokens=20, temperature=0, ignore_eos=True,
                                          on_finish=lambda s, i=i: stats.__setitem__(i, s))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [results[i] for i in range(len(prompts))] == expected
        assert all(stats[i].generated_tokens == 20 for i in range(len(prompts)))
        # The same seed gives the same sampled text in a batch as alone.
        assert batched.generate("ROMEO:", max_tokens=20, temperature=0.9, seed=3, ignore_eos=True) == sampled
        # A repeated prompt takes its full pages from the pool instead of running them again.
        system = "First Citizen:\nBefore we proceed any further, hear me speak. You are all resolved rather to die"
        batched.generate(system + " than to famish?", max_tokens=2, temperature=0, ignore_eos=True)
        batched.generate(system + " or to live?", max_tokens=2, temperature=0, ignore_eos=True)
        assert batched.last_stats.reused_tokens >= 16


def test_parallel_cancel_and_pages_back_to_the_pool():
    with Engine.load(demo_model_path(), progress=False, context_length=256, parallel=2) as batched:
        stop = threading.Event()
        pieces = batched.generate("ROMEO:", stream=True, max_tokens=200, temperature=0, ignore_eos=True, cancel=stop)
        next(pieces)
        stop.set()
        "".join(pieces)
        assert batched.last_stats.finish_reason == "cancelled" and batched.last_stats.generated_tokens < 200
        pool = batched._scheduler.pool
        assert all(page.refs == 0 for page in pool.pages)  # every page released (hashed ones stay cached)


def test_parallel_is_refused_for_recurrent_models(tmp_path, sp_tokenizer_files):
    from conftest import TOKENIZER_VOCAB, add_tokenizer, make_hf_mamba

    from kilnlm.errors import KilnError

    make_hf_mamba(tmp_path, "mamba2", vocab_size=TOKENIZER_VOCAB)
    add_tokenizer(tmp_path, sp_tokenizer_files)
    with pytest.raises(KilnError, match="recurrent layers"):
        Engine.load(tmp_path, progress=False, parallel=2)


def test_load_progress_callback_reports_and_can_abort():
    from kilnlm.runtime.engine import LoadAbortedError

    seen = []
    Engine.load(demo_model_path(), progress=False, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == len(seen) > 10
    with pytest.raises(LoadAbortedError, match="after 3 of"):
        Engine.load(demo_model_path(), progress=False, on_progress=lambda done, total: done < 3)
