"""Unit tests: the LLM replica's stream batching (deployments/server/stream_batching.py).

Orderings only, never times: a batch is handed on before the next item exists, items
made while the consumer is busy are merged, nothing is lost or reordered, an engine
error comes after the items before it, and closing the stream stops the engine's.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.server.stream_batching import ready_batches


def run(coro):
    return asyncio.run(coro)


def test_an_item_is_handed_on_before_the_next_one_is_made():
    async def main():
        may_continue = asyncio.Event()
        made = []

        async def engine():
            made.append("a")
            yield "a"
            await may_continue.wait()
            made.append("b")
            yield "b"

        batches = ready_batches(engine())
        first = await batches.__anext__()
        assert first == ["a"] and made == ["a"]  # no waiting for "b" (a fixed window would)
        may_continue.set()
        assert [batch async for batch in batches] == [["b"]]

    run(main())


def test_items_made_while_the_consumer_is_busy_are_merged_in_order():
    async def main():
        async def engine():
            for i in range(50):
                yield i
                await asyncio.sleep(0)

        batches = []
        async for batch in ready_batches(engine()):
            batches.append(batch)
            for _ in range(5):  # the consumer is slower than the engine
                await asyncio.sleep(0)
        assert [item for batch in batches for item in batch] == list(range(50))
        assert len(batches) < 50 and max(map(len, batches)) > 1

    run(main())


def test_an_engine_error_comes_after_the_items_before_it():
    async def main():
        async def engine():
            yield 1
            yield 2
            raise RuntimeError("engine dead")

        seen = []
        with pytest.raises(RuntimeError, match="engine dead"):
            async for batch in ready_batches(engine()):
                seen.extend(batch)
        assert seen == [1, 2]

    run(main())


def test_closing_the_stream_stops_the_engines_stream():
    async def main():
        closed = asyncio.Event()

        async def engine():
            try:
                i = 0
                while True:
                    yield i
                    i += 1
                    await asyncio.sleep(0.001)
            finally:
                closed.set()

        batches = ready_batches(engine())
        await batches.__anext__()
        await batches.aclose()  # the client went away
        await asyncio.wait_for(closed.wait(), 5)

    run(main())


def test_an_empty_stream_yields_nothing():
    async def main():
        async def engine():
            return
            yield

        assert [batch async for batch in ready_batches(engine())] == []

    run(main())
