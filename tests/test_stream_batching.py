"""Unit tests: the LLM replica's stream batching (deployments/server/stream_batching.py).

Orderings and counts, never speeds: the first output never waits; with few streams open each
output is handed on before the next is made; with many open, outputs made within the interval
are merged; nothing is lost or reordered; the end of a stream is not held back; an engine error
comes after the items before it; closing the stream stops the engine's.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.server.stream_batching import StreamPacer, paced_batches


def run(coro):
    return asyncio.run(coro)


async def ticking(n: int, every_s: float = 0.0):
    for i in range(n):
        yield i
        await asyncio.sleep(every_s)


def test_with_few_streams_an_output_is_handed_on_before_the_next_one_is_made():
    async def main():
        may_continue = asyncio.Event()
        made = []

        async def engine():
            made.append("a")
            yield "a"
            await may_continue.wait()
            made.append("b")
            yield "b"

        batches = paced_batches(engine(), StreamPacer(batches_per_s=1e9))
        assert await batches.__anext__() == ["a"] and made == ["a"]  # a fixed window would wait for "b"
        may_continue.set()
        assert [batch async for batch in batches] == [["b"]]

    run(main())


def test_under_load_outputs_within_the_interval_are_merged_in_order():
    async def main():
        pacer = StreamPacer(batches_per_s=10)  # one stream open: one hand-on per 0.1 s
        batches = [batch async for batch in paced_batches(ticking(40, every_s=0.005), pacer)]
        assert [item for batch in batches for item in batch] == list(range(40))
        assert batches[0] == [0]  # the first output never waits
        assert len(batches) < 40 and max(map(len, batches)) > 1
        assert pacer.open_streams == 0

    run(main())


def test_the_interval_grows_with_the_streams_open():
    pacer = StreamPacer(batches_per_s=100)
    pacer.open_streams = 1
    one = pacer.interval_s()
    pacer.open_streams = 64
    assert pacer.interval_s() == pytest.approx(64 * one)


def test_the_end_of_a_stream_is_not_held_for_the_interval():
    async def main():
        pacer = StreamPacer(batches_per_s=1e-3)  # an interval of 1,000 s per stream
        batches = await asyncio.wait_for(_collect(paced_batches(ticking(3), pacer)), 10)
        assert batches[0] == [0] and [i for b in batches for i in b] == [0, 1, 2]

    run(main())


async def _collect(batches):
    return [batch async for batch in batches]


def test_an_engine_error_comes_after_the_items_before_it():
    async def main():
        async def engine():
            yield 1
            yield 2
            raise RuntimeError("engine dead")

        seen = []
        with pytest.raises(RuntimeError, match="engine dead"):
            async for batch in paced_batches(engine(), StreamPacer()):
                seen.extend(batch)
        assert seen == [1, 2]

    run(main())


def test_closing_the_stream_stops_the_engines_stream_and_frees_its_place():
    async def main():
        closed = asyncio.Event()
        pacer = StreamPacer()

        async def engine():
            try:
                i = 0
                while True:
                    yield i
                    i += 1
                    await asyncio.sleep(0.001)
            finally:
                closed.set()

        batches = paced_batches(engine(), pacer)
        await batches.__anext__()
        assert pacer.open_streams == 1
        await batches.aclose()  # the client went away
        await asyncio.wait_for(closed.wait(), 5)
        assert pacer.open_streams == 0

    run(main())


def test_an_empty_stream_yields_nothing():
    async def main():
        async def engine():
            return
            yield

        assert [batch async for batch in paced_batches(engine(), StreamPacer())] == []

    run(main())


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="batches_per_s"):
        StreamPacer(0)
