"""Our LLM replica class (``server_cls``): ray.serve.llm's LLMServer plus warm-up and load reporting.

Warm-up: vLLM's engine reports started before its first generation has run
(on the CPU engine that first one took over a minute, compiling kernels). The
replica generates one token for itself before its constructor returns, so
Serve marks it RUNNING and routes to it only once it really answers.

Unloaded TPOT: the warm-up then decodes one stream alone and keeps the median
time per output token of its steps, as the engine's own stats time them
(``engine_load`` reports it as ``unloaded_tpot_s``). A profile whose SLO is
what its engine meets at low load scales its TPOT SLO from it
(``router_queues.tpot_slo_from_engine``), so the SLO is this machine's.

Seeded sampling: before that warm-up the replica makes vLLM's workers safe for
seeded requests under chunked prefill (``seeded_sampling.py``; a no-op where
vLLM's generator rewind works, as on GPUs).

Stream batching: a stream's outputs go to the router at a pace set by how many
streams the replica has open (``stream_batching.py``): at once while few are,
merged under load, instead of Ray Serve LLM's fixed 50 ms window. A profile's
``experimental_configs.stream_batches_per_s`` sets the budget; one that sets
``stream_batching_interval_ms`` keeps Ray's window.

GPU signal: the replica asks its vLLM workers (by method name, see
``worker_extension.py``) which GPUs they compute on, then reads those GPUs'
utilisation and memory with NVML every ``GPU_POLL_S``, off the event loop. The
latest reading goes to Serve's autoscaling metrics and to ``engine_load``
(the router's ``/health`` shows it per pool). Without GPUs it is absent.

Engine series: every ``metrics.ENGINE_EXPORT_S`` the replica exports what its
engine did (``engine_load.take_samples``) as the ``llm_engine_*`` metrics the
dashboards read, in place of vLLM's per-token Ray stat logger (see
``engine_load.py`` for why).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import replace

from ray.serve.llm.deployment import LLMServer

from deployments.autoscaling.gpu import GpuGroupReading, device_uuids, read_group
from deployments.config.names import ENGINE_RUNNING, ENGINE_WAITING, GPU_UTILIZATION, KV_CACHE_USAGE, pool_of_deployment
from deployments.observability import metrics
from deployments.observability.tracing import trace_first_output, use_service_name
from deployments.server.engine_load import current_load, step_tpots_since, steps_recorded, take_samples
from deployments.server.load_report import ReplicaLoad
from deployments.server.stream_batching import DEFAULT_BATCHES_PER_S, StreamPacer, paced_batches
from deployments.server.worker_extension import GPU_UUID_RPC, SEEDED_SAMPLING_RPC, extension_kwargs
from deployments.warm_up import measuring_request, one_token_request

logger = logging.getLogger("ray.serve")


class _NoPollAccessLog(logging.Filter):
    """Drops Serve's access-log line for ``engine_load`` calls: every router replica polls each LLM
    replica twice a second, and ``serve run`` shows replica logs on its console, so those lines buried
    everything else there (found by a fresh-eye trial). Requests keep their access lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(record, "serve_access_log", False) and " engine_load " in f" {record.getMessage()} ")


_POLL_FILTER = _NoPollAccessLog()


# How often the GPU group is read; Serve's autoscaling metrics are pushed about
# this often too, and NVML's own sample period is at most 1 s.
GPU_POLL_S = 1.0


class ObservedLLMServer(LLMServer):
    _gpu_reading: GpuGroupReading | None = None
    _pacer: StreamPacer | None = None  # made at the first stream, from the profile
    _unloaded_tpot_s: float | None = None  # measured at warm-up: one stream alone, seconds per output token

    async def start(self):
        logger.addFilter(_POLL_FILTER)  # one instance: adding it again is a no-op
        use_service_name("llm-replica")
        self._add_extension()
        await super().start()
        await self._make_seeded_sampling_safe()
        await self._warm_up()
        loop = asyncio.get_running_loop()
        self._engine_export = loop.create_task(self._export_engine_series())
        group = await self._gpu_group()
        if group:
            self._gpu_watch = loop.create_task(self._watch_gpu(group))

    def _add_extension(self) -> None:
        added = extension_kwargs(self._llm_config.engine_kwargs or {})
        if added is None:
            logger.warning("profile sets its own worker_extension_cls; seeded sampling left as vLLM has it, no GPU signal")
            return
        # update_engine_kwargs (newer Ray) also reaches an engine config cached before start.
        update = getattr(self._llm_config, "update_engine_kwargs", None)
        if update is not None:
            update(**added)
        else:
            self._llm_config.engine_kwargs = {**self._llm_config.engine_kwargs, **added}

    async def _make_seeded_sampling_safe(self) -> None:
        try:
            outcomes = await self._worker_rpc(SEEDED_SAMPLING_RPC)
        except Exception:
            # Not fatal to the replica: only seeded requests are at risk, and the log says so.
            logger.warning("could not patch seeded sampling; seeded requests may fail", exc_info=True)
            return
        logger.info("seeded sampling: %s", "; ".join(map(str, outcomes)))

    async def _worker_rpc(self, method: str) -> list:
        """Call a ``WorkerExtension`` method by name in every vLLM worker of this replica."""
        if hasattr(LLMServer, "collective_rpc"):
            return await self.collective_rpc(method)
        # Ray releases before LLMServer.collective_rpc: the engine client's own, same call.
        return await self.engine._engine_client.collective_rpc(method)

    async def _warm_up(self) -> None:
        started = time.monotonic()
        async for _ in await self.chat(one_token_request(self._llm_config.model_id)):
            pass
        logger.info("engine warmed up: first one-token answer after %.1fs", time.monotonic() - started)
        await self._measure_unloaded_tpot()

    async def _measure_unloaded_tpot(self) -> None:
        """Time one stream alone (nothing else runs before Serve routes here). Not fatal: without it a
        profile's declared SLO stands."""
        mark = steps_recorded()
        try:
            async for _ in await self.chat(measuring_request(self._llm_config.model_id)):
                pass
        except Exception:
            logger.warning("could not measure the engine's unloaded TPOT; the declared SLO stands", exc_info=True)
            return
        steps = step_tpots_since(mark)
        if steps:
            self._unloaded_tpot_s = statistics.median(steps)
            logger.info("engine TPOT with one stream alone: %.1f ms (median of %d steps)",
                        self._unloaded_tpot_s * 1000, len(steps))

    def _batch_output_stream(self, generator):
        """Ray Serve LLM's hook for merging a stream's outputs: ours paced by load (module docstring).
        Called as the stream's request reaches this replica, so it also starts the replica's
        first-output span (deployments/observability/tracing.py; the generator itself when tracing is off)."""
        generator = trace_first_output(generator)
        configs = self._llm_config.experimental_configs
        if configs.get("stream_batching_interval_ms") is not None:
            return super()._batch_output_stream(generator)
        if self._pacer is None:
            self._pacer = StreamPacer(float(configs.get("stream_batches_per_s", DEFAULT_BATCHES_PER_S)))
        return paced_batches(generator, self._pacer)

    async def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics for this replica (see deployments/autoscaling)."""
        load = current_load()
        stats = {ENGINE_WAITING: load.waiting, ENGINE_RUNNING: load.running, KV_CACHE_USAGE: load.kv_cache_usage}
        if self._gpu_reading is not None:
            stats[GPU_UTILIZATION] = self._gpu_reading.utilization
        return stats

    async def _gpu_group(self) -> list[str]:
        """NVML UUIDs of the GPUs this replica's vLLM workers compute on; empty without GPUs."""
        if not device_uuids():  # NVML sees no GPU on this host
            return []
        try:
            uuids = await self._worker_rpc(GPU_UUID_RPC)
        except Exception:
            logger.warning("could not learn this replica's GPU group; no GPU signal", exc_info=True)
            return []
        group = sorted({u for u in uuids if u})
        logger.info("GPU group: %s", ", ".join(group) or "none")
        return group

    async def _watch_gpu(self, group: list[str]) -> None:
        pool, replica = _metric_identity()
        while True:
            try:
                self._gpu_reading = await asyncio.to_thread(read_group, group)
            except Exception:  # a reading must never take the replica down
                logger.warning("GPU reading failed", exc_info=True)
                self._gpu_reading = None
            reading = self._gpu_reading
            if reading is not None:  # gauges only from real readings: absent without GPUs, never zero
                metrics.gpu_group(pool, replica, utilization=reading.utilization,
                                  memory_used_bytes=reading.memory_used_bytes,
                                  memory_total_bytes=reading.memory_total_bytes)
            await asyncio.sleep(GPU_POLL_S)

    async def _export_engine_series(self) -> None:
        pool, replica = _metric_identity()
        while True:
            await asyncio.sleep(metrics.ENGINE_EXPORT_S)
            try:  # an export must never end the loop (or take the replica down)
                load = current_load()
                if self._unfinished_requests() == 0:
                    # vLLM reports load only with a step's outputs: after the last requests were aborted
                    # the scheduler's figures stay at that step's. The frontend knows nothing is left.
                    load = replace(load, running=0, waiting=0)
                metrics.engine_series(pool, replica, load, take_samples())
            except Exception:
                logger.warning("engine series export failed; trying again in %ss", metrics.ENGINE_EXPORT_S,
                               exc_info=True)

    async def engine_load(self) -> ReplicaLoad:
        """vLLM's running / waiting requests and KV-cache usage on this replica, its GPU group's latest
        reading (``gpu``: utilisation 0..1, memory bytes; None without GPUs) and its TPOT with one stream
        alone measured at warm-up (``unloaded_tpot_s``, seconds; None if not measured)."""
        return replace(current_load(), unfinished=self._unfinished_requests(),
                       gpu=self._gpu_reading.as_dict() if self._gpu_reading is not None else None,
                       unloaded_tpot_s=self._unloaded_tpot_s)

    def _unfinished_requests(self) -> int | None:
        # The frontend's own count of requests not yet finished or aborted; it
        # moves even when the engine is idle and sends no more scheduler stats.
        client = getattr(self.engine, "_engine_client", None)
        processor = getattr(client, "output_processor", None)
        return processor.get_num_unfinished_requests() if processor is not None else None


def _metric_identity() -> tuple[str, str]:
    """(pool, replica id) labels for this replica's GPU and engine series."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return pool_of_deployment(context.deployment) or context.deployment, context.replica_id.unique_id
    except Exception:
        return metrics.NONE, metrics.NONE
