"""Methods the LLM replica calls inside its vLLM workers, by name.

vLLM's ``worker_extension_cls`` is mixed into the worker class in each worker
process; the replica then calls its methods with ``collective_rpc("name")``.
Sending a Python function instead needs vLLM's insecure pickling
(``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), which the engine refuses by default
and which this project never turns on: on the H200 the function form failed
and the replica reported no GPU signal at all.

Every method name starts with ``llm_serving_`` because vLLM refuses an
extension whose attributes clash with its worker's.
"""

from __future__ import annotations

from deployments.server.seeded_sampling import make_seeded_sampling_safe

EXTENSION_QUALNAME = "deployments.server.worker_extension.WorkerExtension"
SEEDED_SAMPLING_RPC = "llm_serving_make_seeded_sampling_safe"
GPU_UUID_RPC = "llm_serving_gpu_uuid"


class WorkerExtension:
    def llm_serving_make_seeded_sampling_safe(self) -> str:
        """See seeded_sampling.py: patches this worker's model runner where vLLM's rewind would fail."""
        return make_seeded_sampling_safe(self)

    def llm_serving_gpu_uuid(self) -> str | None:
        """The NVML UUID ("GPU-…") of the GPU this worker computes on; None on a CPU worker."""
        device = getattr(self, "device", None)
        if device is None or getattr(device, "type", None) != "cuda":
            return None
        import torch

        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def extension_kwargs(engine_kwargs: dict) -> dict | None:
    """The engine_kwargs to add for our worker extension, or None where the profile names its own."""
    if engine_kwargs.get("worker_extension_cls") not in (None, EXTENSION_QUALNAME):
        return None
    return {"worker_extension_cls": EXTENSION_QUALNAME}
