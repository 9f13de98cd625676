"""Stream batching paced by load: tokens go on at once while few streams are open, merged under load.

Ray Serve LLM merges a stream's engine outputs over a fixed window (``stream_batching_interval_ms``,
50 ms by default) so that fewer objects cross the handle from the LLM replica to the router. The H200
measurements (docs/streaming.md) show both sides of that trade:

- at one stream the window is the whole gap between tokens: gap p99 51 ms, TTFT +39 ms over bare
  vLLM; handing each output on at once gave gap p99 +0.6 ms, TTFT +12-17 ms (pass 3);
- at 64 and 256 streams, handing each output on at once cost 1.7-4.2x the Serve path's CPU per
  chunk and halved output tok/s (0.43x and 0.29-0.36x bare, against the window's 0.77-0.92x and
  0.48x): Serve's replica drains the stream as fast as it comes, so nothing piled up to merge.

So the pace comes from the replica's load: each stream hands on what it has at most once per
``open streams / batches_per_s`` seconds, and at once when that much time has passed since its last
hand-on. ``batches_per_s`` is the replica's budget of hand-ons per second over all its streams
(``DEFAULT_BATCHES_PER_S``: 64 streams under the 50 ms window, the best measured path at that load,
made 1,280 a second). One stream then waits at most 1/1000 s, less than one engine step on the H200
(4.7 ms gap p50), and 64 streams about 64 ms, close to the window. The first output of a stream
never waits.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncGenerator, AsyncIterator, List, TypeVar

T = TypeVar("T")

# Hand-ons per second for all of a replica's streams together (module docstring, pass 2 and 3).
DEFAULT_BATCHES_PER_S = 1000.0


class StreamPacer:
    """One per replica process: the streams open now, and so how long each waits between hand-ons."""

    def __init__(self, batches_per_s: float = DEFAULT_BATCHES_PER_S):
        if not batches_per_s > 0:
            raise ValueError(f"batches_per_s must be > 0, got {batches_per_s!r}")
        self.batches_per_s = batches_per_s
        self.open_streams = 0

    def interval_s(self) -> float:
        """Seconds one stream waits between two hand-ons at the current load."""
        return self.open_streams / self.batches_per_s


async def paced_batches(outputs: AsyncIterator[T], pacer: StreamPacer) -> AsyncGenerator[List[T], None]:
    """Lists of ``outputs`` items, in order: the first at once, each next one once the pacer's interval
    has passed since the last (with every item ready by then), or at once when ``outputs`` ends.

    The items are read by a task of their own, so they keep arriving while a batch is on its way.
    An error of ``outputs`` is raised after the items before it have been yielded. Closing this
    generator (the client went away) cancels the reading task, which closes ``outputs``: the
    engine aborts the request, as with Ray Serve LLM's own batcher.
    """
    ready: List[T] = []
    arrived, finished = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        try:
            async for item in outputs:
                ready.append(item)
                arrived.set()
        finally:
            finished.set()
            arrived.set()

    loop = asyncio.get_running_loop()
    reader = loop.create_task(read())
    pacer.open_streams += 1
    last = -math.inf
    try:
        while True:
            await arrived.wait()
            hold = last + pacer.interval_s() - loop.time()
            if hold > 0 and not finished.is_set():
                try:  # let more pile up, but not past the stream's end
                    async with asyncio.timeout(hold):
                        await finished.wait()
                except TimeoutError:
                    pass
            arrived.clear()
            if ready:
                batch = ready.copy()
                ready.clear()
                last = loop.time()
                yield batch
            if finished.is_set() and not ready:
                await reader  # done: raises the engine's error, if it ended with one
                return
    finally:
        pacer.open_streams -= 1
        if not reader.done():
            reader.cancel()
