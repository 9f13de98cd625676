"""Check the NVML reader on a real GPU: idle, then under a PyTorch matmul loop.

    python bench/nvml_check.py
Prints one line per phase and a JSON summary. Needs torch with CUDA and nvidia-ml-py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from deployments.autoscaling.gpu import device_uuids, sample_utilization  # noqa: E402


def busy_loop(stop: threading.Event) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            a = (a @ b).clamp_(-1, 1)
        torch.cuda.synchronize()


def main() -> None:
    uuids = device_uuids()
    print("GPUs:", uuids, torch.cuda.get_device_name(0))
    torch.cuda.init()
    time.sleep(2)
    idle = sample_utilization(uuids, samples=10, interval_s=0.3)
    stop = threading.Event()
    worker = threading.Thread(target=busy_loop, args=(stop,))
    worker.start()
    time.sleep(3)  # let the loop and NVML's sample window fill
    busy = sample_utilization(uuids, samples=10, interval_s=0.3)
    stop.set()
    worker.join()
    time.sleep(3)
    after = sample_utilization(uuids, samples=10, interval_s=0.3)
    result = {"device": torch.cuda.get_device_name(0), "idle": idle, "busy_matmul": busy, "idle_after": after}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
