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
