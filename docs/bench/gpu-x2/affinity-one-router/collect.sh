#!/usr/bin/env bash
# GPU pass 8, call 8 (device side, after bench/gpu_two_replicas.py prefix with ROUTERS=1): what the run's logs
# hold, packed into $OUT beside the bench's own files (<= 8 files come back from a call).
#   $OUT/queue_length_counts.txt  `grep -c "Failed to get queue length"` per serve log
#   $OUT/ports.txt                counts of the engines' "Port 1xx is already in use" lines and tcp:// ports
#   $OUT/router_logs.tgz          the whole Router replica logs, tails (200 lines) of worker-*.err naming a
#                                 failure, hold_ports.py's output
L=/tmp/ray/session_latest/logs
C=/tmp/c8
mkdir -p $C/router $C/worker_err
grep -c "Failed to get queue length" $L/serve/*.log > $OUT/queue_length_counts.txt 2>&1
grep -h -o -E "Port 1[0-9][0-9] is already in use|Engine core initialization failed|EADDRINUSE|tcp://[0-9.]+:[0-9]+" \
  $L/worker-*.err $L/worker-*.out $L/serve/*.log 2>/dev/null | sort | uniq -c > $OUT/ports.txt
cp $L/serve/replica_llm_Router_*.log $C/router/ 2>/dev/null
for f in $(grep -l -E "Error|failed" $L/worker-*.err 2>/dev/null | head -40); do
  tail -200 "$f" > $C/worker_err/$(basename "$f")
done
cp /tmp/hold_ports.txt $C/ 2>/dev/null
ls -la $L/serve/ > $C/serve_logs_ls.txt 2>&1
tar -czf $OUT/router_logs.tgz -C $C . 
# a call brings back files up to 16 MiB: if the whole Router logs are too big, keep each one's first and last 20 MB
if [ $(stat -c %s $OUT/router_logs.tgz) -gt 15000000 ]; then
  for f in $C/router/*.log; do { head -c 20000000 "$f"; echo "... (cut) ..."; tail -c 20000000 "$f"; } > "$f.cut" && mv "$f.cut" "$f"; done
  tar -czf $OUT/router_logs.tgz -C $C .
fi
ls -la $OUT
