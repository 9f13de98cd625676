"""Hold TCP ports 100-131 for SECONDS (default 900) so that vLLM 0.26's RayExecutorV2._select_tcpstore_port,
which for a non-DP engine scans 0 + 100 + 0*32 .. +31 (data_parallel_rank_local 0, master port 0) and hands
every co-located engine port 100, finds its window full and falls back to a random free port (get_open_port).
Upstream fix: vllm-project/vllm PR 53666. Device-side workaround only; no project code involved."""
import socket
import sys
import time

held, failed = [], []
for port in range(100, 132):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("", port))
        s.listen(1)
        held.append(s)
    except OSError as e:
        failed.append((port, str(e)))
        s.close()
print(f"held {len(held)} ports of 100-131; could not bind: {failed}", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 900)
