"""Our LLM replica class (``server_cls``): ray.serve.llm's LLMServer plus warm-up and load reporting.

Warm-up: vLLM's engine reports started before its first generation has run
(on the CPU engine that first one took over a minute, compiling kernels). The
replica generates one token for itself before its constructor returns, so
Serve marks it RUNNING and routes to it only once it really answers.

Seeded sampling: before that warm-up the replica makes vLLM's workers safe for
seeded requests under chunked prefill (``seeded_sampling.py``; a no-op where
vLLM's generator rewind works, as on GPUs).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.serve.llm.deployment import LLMServer

from deployments.autoscaling.gpu import device_uuids, sample_utilization
from deployments.server.engine_load import current_load
from deployments.server.seeded_sampling import RPC_METHOD, extension_kwargs
from deployments.warm_up import one_token_request

logger = logging.getLogger("ray.serve")


def _worker_gpu_uuid(worker) -> str | None:
    """Runs inside each vLLM worker: the NVML UUID of the GPU it computes on."""
    import torch

    if not torch.cuda.is_available():
        return None
    return f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"


class ObservedLLMServer(LLMServer):
    _gpu_group: list[str] | None = None

    async def start(self):
        self._add_seeded_sampling_extension()
        await super().start()
        await self._make_seeded_sampling_safe()
        await self._warm_up()

    def _add_seeded_sampling_extension(self) -> None:
        added = extension_kwargs(self._llm_config.engine_kwargs or {})
        if added is None:
            logger.warning("profile sets its own worker_extension_cls; seeded sampling left as vLLM has it")
            return
        # update_engine_kwargs (newer Ray) also reaches an engine config cached before start.
        update = getattr(self._llm_config, "update_engine_kwargs", None)
        if update is not None:
            update(**added)
        else:
            self._llm_config.engine_kwargs = {**self._llm_config.engine_kwargs, **added}

    async def _make_seeded_sampling_safe(self) -> None:
        try:
            outcomes = await self.collective_rpc(RPC_METHOD)
        except Exception:
            # Not fatal to the replica: only seeded requests are at risk, and the log says so.
            logger.warning("could not patch seeded sampling; seeded requests may fail", exc_info=True)
            return
        logger.info("seeded sampling: %s", "; ".join(map(str, outcomes)))

    async def _warm_up(self) -> None:
        started = time.monotonic()
        async for _ in await self.chat(one_token_request(self._llm_config.model_id)):
            pass
        logger.info("engine warmed up: first one-token answer after %.1fs", time.monotonic() - started)

    async def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics for this replica (see deployments/autoscaling)."""
        load = current_load()
        stats = {"engine_waiting": load.waiting, "engine_running": load.running, "kv_cache_usage": load.kv_cache_usage}
        group = await self._gpu_uuids()
        if group:
            utilization = await asyncio.to_thread(sample_utilization, group, 3, 0.1)
            if utilization is not None:
                stats["gpu_utilization"] = utilization
        return stats

    async def _gpu_uuids(self) -> list[str]:
        """This replica's GPU group, asked once of its vLLM workers; empty without GPUs."""
        if self._gpu_group is None:
            self._gpu_group = []
            if device_uuids():  # NVML sees GPUs on this host
                try:
                    uuids = await self.engine._engine_client.collective_rpc(_worker_gpu_uuid)
                    self._gpu_group = [u for u in uuids if u]
                except Exception:
                    logger.warning("could not learn this replica's GPU group; no GPU signal", exc_info=True)
        return self._gpu_group

    async def engine_load(self) -> dict:
        """vLLM's running / waiting requests and KV-cache usage on this replica."""
        load = current_load().as_dict()
        load["unfinished"] = self._unfinished_requests()
        return load

    def _unfinished_requests(self) -> int | None:
        # The frontend's own count of requests not yet finished or aborted; it
        # moves even when the engine is idle and sends no more scheduler stats.
        client = getattr(self.engine, "_engine_client", None)
        processor = getattr(client, "output_processor", None)
        return processor.get_num_unfinished_requests() if processor is not None else None
