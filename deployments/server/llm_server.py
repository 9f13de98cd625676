"""Our LLM replica class (``server_cls``): ray.serve.llm's LLMServer plus load reporting."""

from __future__ import annotations

from ray.serve.llm.deployment import LLMServer

from deployments.server.engine_load import current_load


class ObservedLLMServer(LLMServer):
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
