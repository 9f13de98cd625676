"""GPU utilisation of a replica's own GPU group, read with NVML (nvidia-ml-py).

On a host without NVIDIA GPUs (or without the driver) every reading is None:
the signal is absent, never faked, and the policy decides from the rest.
NVML's utilisation is the share of the last sample period (1/6 s to 1 s,
per device) in which a kernel ran; averaging a few samples smooths it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

try:
    import pynvml
except ImportError:  # nvidia-ml-py not installed: no GPU signal
    pynvml = None


def _init() -> bool:
    if pynvml is None:
        return False
    try:
        pynvml.nvmlInit()
        return True
    except pynvml.NVMLError:
        return False


def device_uuids() -> list[str]:
    """Every GPU NVML sees on this host."""
    if not _init():
        return []
    count = pynvml.nvmlDeviceGetCount()
    return [_as_str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_utilization(uuids: Sequence[str]) -> Optional[float]:
    """Mean utilisation (0..1) over the given GPUs now; None if unmeasurable."""
    if not uuids or not _init():
        return None
    try:
        rates = [pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByUUID(u)).gpu for u in uuids]
    except pynvml.NVMLError:
        return None
    return sum(rates) / len(rates) / 100.0


def read_memory(uuids: Sequence[str]) -> Optional[tuple[int, int]]:
    """(used, total) bytes summed over the given GPUs now; None if unmeasurable."""
    if not uuids or not _init():
        return None
    try:
        infos = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(u)) for u in uuids]
    except pynvml.NVMLError:
        return None
    return sum(int(i.used) for i in infos), sum(int(i.total) for i in infos)


@dataclass(frozen=True)
class GpuGroupReading:
    """One look at a replica's GPU group: utilisation 0..1 (mean over its GPUs), memory in bytes (summed)."""

    gpus: int
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def read_group(uuids: Sequence[str], samples: int = 3, interval_s: float = 0.1) -> Optional[GpuGroupReading]:
    """Utilisation (averaged over ``samples`` readings) and memory of a GPU group; None without NVML or GPUs.

    Blocks for about ``samples`` x ``interval_s`` seconds: call it off the event loop.
    """
    utilization = sample_utilization(uuids, samples, interval_s)
    memory = read_memory(uuids)
    if utilization is None or memory is None:
        return None
    return GpuGroupReading(len(uuids), utilization, *memory)


def sample_utilization(uuids: Sequence[str], samples: int = 5, interval_s: float = 0.2) -> Optional[float]:
    """Average of a few readings, spaced out, so one idle sample doesn't mislead."""
    readings: list[float] = []
    for i in range(samples):
        reading = read_utilization(uuids)
        if reading is None:
            return None
        readings.append(reading)
        if i + 1 < samples:
            time.sleep(interval_s)
    return sum(readings) / len(readings)
