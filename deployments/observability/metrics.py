"""The app's own metrics, exported through Ray's metrics agent (``ray.util.metrics``).

Ray Serve LLM exports its metrics the same way (and vLLM's, as ``ray_vllm_*``,
where ``log_engine_metrics`` is on: our profiles turn it off and export the
engine's series themselves, below); Prometheus scrapes every node's metrics export port, found in Ray's
service-discovery file (``deployments/observability/prometheus.yml``). Ray
prefixes every name with ``ray_`` and counters with ``_total``: the counter
``llm_router_requests`` is scraped as ``ray_llm_router_requests_total``.

What is recorded where:

- the router (``router/dispatch.py``): one outcome per request, decided where
  the router decides it (``outcome`` a status code, ``reason`` from the fixed
  set ``REASONS``), queue wait, TTFT and time per output token of streams,
  prompt / output tokens, goodput against the class SLO, engine tokens wasted
  on requests that were given up; 400 / 413 before a pool is chosen
  (``router/ingress.py``, ``json_body.py``, ``request_limits.py``, ``errors.py``)
  are labelled ``pool="none", class="none"``;
- the router's pool watch (``router/pool.py``, every ``POLL_S``): queue depth
  and in-flight per class, the adaptive window, circuit state, readiness,
  running LLM replicas;
- the autoscaling policy (Serve controller): target and current replicas and
  the signal that drove the decision;
- each LLM replica: its GPU group's NVML utilisation and memory, only where
  it has GPUs (no series at all without them, never a zero); and, every
  ``ENGINE_EXPORT_S``, its engine's running / waiting requests, KV-cache
  usage, prompt / generated tokens, prefix-cache lookups, engine-side TTFT and
  per-step inter-token latency, gathered by ``server/engine_load.py`` (these
  replace vLLM's ``ray_vllm_*``, which profiles turn off: ``log_engine_metrics:
  false``, see that module).

Recording never raises into a request (every entry point is wrapped) and is
done once per request, never per chunk. Label values come from fixed sets
(pools and classes are configuration, tenants the tenants file's names; reasons are ``REASONS``), never from
free text, so the number of series stays bounded.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

logger = logging.getLogger("ray.serve")

# --- names (without Ray's ``ray_`` prefix; counters gain ``_total`` on export) ----------------

REQUESTS = "llm_router_requests"
QUEUE_WAIT = "llm_router_queue_wait_seconds"
TTFT = "llm_router_ttft_seconds"
TPOT = "llm_router_time_per_output_token_seconds"
E2E = "llm_router_request_seconds"
PROMPT_TOKENS = "llm_router_prompt_tokens"
OUTPUT_TOKENS = "llm_router_output_tokens"
GOODPUT_TOKENS = "llm_router_goodput_tokens"
WITHIN_SLO = "llm_router_requests_within_slo"
WASTED_TOKENS = "llm_router_wasted_engine_tokens"
QUEUE_DEPTH = "llm_router_queue_depth"
IN_FLIGHT = "llm_router_in_flight"
WINDOW = "llm_router_window_per_replica"
CIRCUIT = "llm_router_circuit_state"
POOL_READY = "llm_router_pool_ready"
REPLICAS = "llm_router_pool_running_replicas"
AUTOSCALER_TARGET = "llm_autoscaling_target_replicas"
AUTOSCALER_CURRENT = "llm_autoscaling_current_replicas"
AUTOSCALER_SIGNAL = "llm_autoscaling_signal"
GPU_UTILIZATION = "llm_replica_gpu_utilization"
GPU_MEMORY_USED = "llm_replica_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "llm_replica_gpu_memory_total_bytes"
ENGINE_RUNNING = "llm_engine_requests_running"
ENGINE_WAITING = "llm_engine_requests_waiting"
ENGINE_KV_CACHE_USAGE = "llm_engine_kv_cache_usage"
ENGINE_PROMPT_TOKENS = "llm_engine_prompt_tokens"
ENGINE_GENERATION_TOKENS = "llm_engine_generation_tokens"
ENGINE_PREFIX_CACHE_QUERIES = "llm_engine_prefix_cache_queries"
ENGINE_PREFIX_CACHE_HITS = "llm_engine_prefix_cache_hits"
ENGINE_TTFT = "llm_engine_ttft_seconds"
ENGINE_STEP_ITL = "llm_engine_step_inter_token_latency_seconds"
TENANT_REQUESTS = "llm_router_tenant_requests"
TENANT_TOKENS = "llm_router_tenant_tokens"

EXPORT_PREFIX = "ray_"
COUNTERS = (REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS, GOODPUT_TOKENS, WITHIN_SLO, WASTED_TOKENS, TENANT_REQUESTS,
            TENANT_TOKENS, ENGINE_PROMPT_TOKENS, ENGINE_GENERATION_TOKENS, ENGINE_PREFIX_CACHE_QUERIES,
            ENGINE_PREFIX_CACHE_HITS)
HISTOGRAMS = (QUEUE_WAIT, TTFT, TPOT, E2E, ENGINE_TTFT, ENGINE_STEP_ITL)
ROUTER_GAUGES = (QUEUE_DEPTH, IN_FLIGHT, WINDOW, CIRCUIT, POOL_READY, REPLICAS)
AUTOSCALER_GAUGES = (AUTOSCALER_TARGET, AUTOSCALER_CURRENT, AUTOSCALER_SIGNAL)
GPU_GAUGES = (GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL)
ENGINE_GAUGES = (ENGINE_RUNNING, ENGINE_WAITING, ENGINE_KV_CACHE_USAGE)

# How often an LLM replica exports its engine series: each export costs a few Ray metric calls plus
# one per TTFT and per decoding step gathered, so the rate bounds it; Ray's metrics agent reports
# every few seconds anyway (RAY_metrics_report_interval_ms), and Prometheus scrapes slower still.
ENGINE_EXPORT_S = 1.0


def exported(name: str) -> str:
    """The name Prometheus sees for one of ours (a histogram's series add _bucket/_sum/_count)."""
    return EXPORT_PREFIX + name + ("_total" if name in COUNTERS else "")


# --- bounded label values ------------------------------------------------------------------------

NONE = "none"  # pool / class of a request refused before either was chosen
# The outcome label: the status the client saw (for a stream, what its last event said).
# 499 (nginx's "client closed request"): the client went away before the answer ended.
OUTCOMES = frozenset({"200", "400", "401", "404", "408", "413", "429", "499", "503", "504", "4xx", "5xx"})
REASONS = frozenset({
    "ok",
    # 400 / 413 at the door
    "body_too_large", "invalid_json", "strict_json", "schema", "http_error", "invalid_messages",
    "invalid_token_ids", "classification", "admission", "timeout_header",
    # 400 once planned: an X-Request-Timeout shorter than the request needs with the engine to itself
    "client_timeout_too_short",
    # 408: the body stalled
    "body_timeout",
    # 401 / 429 for the caller's key and tier
    "unauthorized", "rate_limited",
    # 503: the pool cannot serve
    "loading", "circuit_open", "replica_error",
    # 429: refused for load, no engine work spent
    "predicted_wait", "client_timeout_forecast", "queue_full", "shed", "queue_expired",
    # 504
    "client_timeout_queued", "start_deadline", "deadline", "client_timeout", "generation_budget", "stall",
    # from the engine (4xx: its own validation refused the request; else it failed) / the client
    "engine_rejected", "engine_error", "client_gone",
})
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
AUTOSCALER_SIGNALS = ("queue", "kv_cache", "gpu", "idle", "bounds", "hold")

_SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600]
_QUEUE_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600]
_TPOT_BUCKETS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2]
_ENGINE_TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 600]


def outcome_of(status: int) -> str:
    text = str(status)
    return text if text in OUTCOMES else ("4xx" if 400 <= status < 500 else "5xx" if status >= 500 else "200")


def _reason(reason: str) -> str:
    return reason if reason in REASONS else "engine_error"


def engine_reason(status: int) -> str:
    """The reason label of an error answer from the engine: ``engine_rejected`` for a 4xx (the client's
    request failed the engine's own validation; not the service's fault), ``engine_error`` otherwise."""
    return "engine_rejected" if 400 <= status < 500 else "engine_error"


# --- the metric objects, made on first use in the process that records -------------------------

_made: dict[str, object] = {}
_failed_once: set[str] = set()


def _metric(name: str):
    metric = _made.get(name)
    if metric is None:
        metric = _made[name] = _make(name)
    return metric


def _make(name: str):
    from ray.util.metrics import Counter, Gauge, Histogram

    pool_class = ("pool", "class")
    specs = {
        REQUESTS: (Counter, "Router requests by final outcome (status) and reason", pool_class + ("outcome", "reason")),
        PROMPT_TOKENS: (Counter, "Prompt tokens of requests the router sent to an engine", pool_class),
        OUTPUT_TOKENS: (Counter, "Output tokens of answers the router delivered", pool_class),
        GOODPUT_TOKENS: (Counter, "Output tokens of answers that met their class's SLO (TTFT and TPOT)", pool_class),
        WITHIN_SLO: (Counter, "Served requests that met their class's SLO (TTFT and TPOT)", pool_class),
        WASTED_TOKENS: (Counter, "Engine tokens generated for requests the router or the client gave up",
                        pool_class + ("reason",)),
        QUEUE_WAIT: (Histogram, "Seconds a started request waited in the router's queue", pool_class, _QUEUE_BUCKETS),
        TTFT: (Histogram, "Seconds from arrival to the first token of a stream", pool_class, _SECONDS_BUCKETS),
        TPOT: (Histogram, "Seconds per output token after the first, per stream", pool_class, _TPOT_BUCKETS),
        E2E: (Histogram, "Seconds from arrival to the end of a served answer", pool_class, _SECONDS_BUCKETS),
        QUEUE_DEPTH: (Gauge, "Requests waiting in the router's queue", pool_class),
        IN_FLIGHT: (Gauge, "Requests the router has started toward the pool's engines", pool_class),
        WINDOW: (Gauge, "The router's adaptive concurrency window per running LLM replica", ("pool",)),
        CIRCUIT: (Gauge, "The pool's circuit: 0 closed, 1 half open, 2 open", ("pool",)),
        POOL_READY: (Gauge, "1 once the pool's engine answered its warm-up request", ("pool",)),
        REPLICAS: (Gauge, "RUNNING LLM replicas of the pool, as the router reads them from Serve", ("pool",)),
        AUTOSCALER_TARGET: (Gauge, "Target replicas the autoscaling policy decided", ("deployment", "pool")),
        AUTOSCALER_CURRENT: (Gauge, "Replicas when the autoscaling policy decided", ("deployment", "pool")),
        AUTOSCALER_SIGNAL: (Gauge, "1 for the signal that drove the policy's latest decision, else 0",
                            ("deployment", "pool", "signal")),
        GPU_UTILIZATION: (Gauge, "NVML utilisation of the replica's GPU group, 0..1 (mean over its GPUs)",
                          ("pool", "replica")),
        GPU_MEMORY_USED: (Gauge, "NVML memory used on the replica's GPU group, bytes (summed)", ("pool", "replica")),
        GPU_MEMORY_TOTAL: (Gauge, "NVML memory of the replica's GPU group, bytes (summed)", ("pool", "replica")),
        ENGINE_RUNNING: (Gauge, "Requests the replica's engine is running (vLLM scheduler)", ("pool", "replica")),
        ENGINE_WAITING: (Gauge, "Requests waiting in the replica's engine (vLLM scheduler)", ("pool", "replica")),
        ENGINE_KV_CACHE_USAGE: (Gauge, "KV-cache blocks in use on the replica's engine, 0..1", ("pool", "replica")),
        ENGINE_PROMPT_TOKENS: (Counter, "Prompt tokens the engine prefilled (prefix-cache hits included)",
                               ("pool", "replica")),
        ENGINE_GENERATION_TOKENS: (Counter, "Tokens the engine generated, whether or not delivered",
                                   ("pool", "replica")),
        ENGINE_PREFIX_CACHE_QUERIES: (Counter, "Prompt tokens looked up in the engine's prefix cache",
                                      ("pool", "replica")),
        ENGINE_PREFIX_CACHE_HITS: (Counter, "Prompt tokens found in the engine's prefix cache", ("pool", "replica")),
        ENGINE_TTFT: (Histogram, "Seconds from a request's arrival at the engine to its first token",
                      ("pool", "replica"), _ENGINE_TTFT_BUCKETS),
        ENGINE_STEP_ITL: (Histogram, "Seconds between tokens in one engine decoding step (the step's mean; one "
                          "observation per step, not per token)", ("pool", "replica"), _TPOT_BUCKETS),
        TENANT_REQUESTS: (Counter, "Requests per tenant (from the tenants file; never a key) by outcome",
                          ("tenant", "outcome")),
        TENANT_TOKENS: (Counter, "Tokens per tenant: prompt tokens sent to an engine, output tokens delivered",
                        ("tenant", "kind")),
    }
    kind, description, tags, *buckets = specs[name]
    if kind is Histogram:
        return Histogram(name, description, boundaries=buckets[0], tag_keys=tags)
    return kind(name, description, tag_keys=tags)


def _safely(what: str, action) -> None:
    try:
        action()
    except Exception:  # a metric must never fail a request or a watch
        if what not in _failed_once:
            _failed_once.add(what)
            logger.warning("could not record metric %s (further failures are not logged)", what, exc_info=True)


# --- the router: one request ---------------------------------------------------------------------


def refused_at_door(status: int, reason: str) -> None:
    """A 400 / 413 (or other 4xx) answered before a pool and class were chosen."""
    _safely(REQUESTS, lambda: _metric(REQUESTS).inc(1, tags={
        "pool": NONE, "class": NONE, "outcome": outcome_of(status), "reason": _reason(reason)}))


def request_finished(pool: str, cls: str, status: int, reason: str) -> None:
    _safely(REQUESTS, lambda: _metric(REQUESTS).inc(1, tags={
        "pool": pool, "class": cls, "outcome": outcome_of(status), "reason": _reason(reason)}))


def tenant_request(tenant: str, status: int, *, prompt_tokens: int, output_tokens: int) -> None:
    """One request of ``tenant`` ended with ``status``; what it used (401s have no tenant: ``refused_at_door``)."""
    def record():
        _metric(TENANT_REQUESTS).inc(1, tags={"tenant": tenant, "outcome": outcome_of(status)})
        if prompt_tokens > 0:
            _metric(TENANT_TOKENS).inc(prompt_tokens, tags={"tenant": tenant, "kind": "prompt"})
        if output_tokens > 0:
            _metric(TENANT_TOKENS).inc(output_tokens, tags={"tenant": tenant, "kind": "output"})
    _safely("tenant_request", record)


def queue_waited(pool: str, cls: str, seconds: float) -> None:
    _safely(QUEUE_WAIT, lambda: _metric(QUEUE_WAIT).observe(max(0.0, seconds), tags={"pool": pool, "class": cls}))


def engine_work(pool: str, cls: str, *, prompt_tokens: int, output_tokens: Optional[int], served: bool,
                ttft_s: Optional[float], tpot_s: Optional[float], e2e_s: Optional[float],
                within_slo: bool, wasted_reason: Optional[str] = None) -> None:
    """What one request that reached an engine cost and delivered; called once, when it ended."""
    def record():
        tags = {"pool": pool, "class": cls}
        if prompt_tokens > 0:
            _metric(PROMPT_TOKENS).inc(prompt_tokens, tags=tags)
        if served:
            if output_tokens:
                _metric(OUTPUT_TOKENS).inc(output_tokens, tags=tags)
            if ttft_s is not None:
                _metric(TTFT).observe(ttft_s, tags=tags)
            if tpot_s is not None:
                _metric(TPOT).observe(tpot_s, tags=tags)
            if e2e_s is not None:
                _metric(E2E).observe(e2e_s, tags=tags)
            if within_slo:
                _metric(WITHIN_SLO).inc(1, tags=tags)
                if output_tokens:
                    _metric(GOODPUT_TOKENS).inc(output_tokens, tags=tags)
        elif wasted_reason is not None and output_tokens:
            _metric(WASTED_TOKENS).inc(output_tokens, tags={**tags, "reason": _reason(wasted_reason)})
    _safely("engine_work", record)


# --- the router: one pool, every POLL_S ----------------------------------------------------------


def pool_state(pool: str, *, depths: Mapping[str, int], running: Mapping[str, int], window: int,
               circuit: str, ready: bool, replicas: int) -> None:
    def record():
        for cls, depth in depths.items():
            _metric(QUEUE_DEPTH).set(depth, tags={"pool": pool, "class": cls})
        for cls, count in running.items():
            _metric(IN_FLIGHT).set(count, tags={"pool": pool, "class": cls})
        _metric(WINDOW).set(window, tags={"pool": pool})
        _metric(CIRCUIT).set(CIRCUIT_VALUES.get(circuit, 2), tags={"pool": pool})
        _metric(POOL_READY).set(1 if ready else 0, tags={"pool": pool})
        _metric(REPLICAS).set(replicas, tags={"pool": pool})
    _safely("pool_state", record)


# --- the autoscaling policy ------------------------------------------------------------------------


def autoscaling_decision(deployment: str, pool: Optional[str], *, current: int, target: int, signal: str) -> None:
    def record():
        tags = {"deployment": deployment, "pool": pool or NONE}
        _metric(AUTOSCALER_TARGET).set(target, tags=tags)
        _metric(AUTOSCALER_CURRENT).set(current, tags=tags)
        for name in AUTOSCALER_SIGNALS:  # one-hot: a signal's old series never lingers at 1
            _metric(AUTOSCALER_SIGNAL).set(1 if name == signal else 0, tags={**tags, "signal": name})
    _safely("autoscaling_decision", record)


# --- an LLM replica's GPU group --------------------------------------------------------------------


def gpu_group(pool: str, replica: str, *, utilization: float, memory_used_bytes: int,
              memory_total_bytes: int) -> None:
    """Only ever called with a real NVML reading: without GPUs these series do not exist."""
    def record():
        tags = {"pool": pool, "replica": replica}
        _metric(GPU_UTILIZATION).set(utilization, tags=tags)
        _metric(GPU_MEMORY_USED).set(memory_used_bytes, tags=tags)
        _metric(GPU_MEMORY_TOTAL).set(memory_total_bytes, tags=tags)
    _safely("gpu_group", record)


def engine_series(pool: str, replica: str, load, samples) -> None:
    """One export of an LLM replica's engine: ``load`` a ``ReplicaLoad`` (gauges), ``samples`` the
    ``EngineSamples`` gathered since the last export (counters and histograms)."""
    def record():
        tags = {"pool": pool, "replica": replica}
        _metric(ENGINE_RUNNING).set(load.running, tags=tags)
        _metric(ENGINE_WAITING).set(load.waiting, tags=tags)
        _metric(ENGINE_KV_CACHE_USAGE).set(load.kv_cache_usage, tags=tags)
        for name, count in ((ENGINE_PROMPT_TOKENS, samples.prompt_tokens),
                            (ENGINE_GENERATION_TOKENS, samples.generation_tokens),
                            (ENGINE_PREFIX_CACHE_QUERIES, samples.prefix_cache_queries),
                            (ENGINE_PREFIX_CACHE_HITS, samples.prefix_cache_hits)):
            if count > 0:  # a Ray counter refuses 0
                _metric(name).inc(count, tags=tags)
        for name, values in ((ENGINE_TTFT, samples.ttft_s), (ENGINE_STEP_ITL, samples.step_itl_s)):
            histogram = _metric(name)
            for value in values:
                histogram.observe(max(0.0, float(value)), tags=tags)
    _safely("engine_series", record)


def all_names() -> Iterable[str]:
    return COUNTERS + HISTOGRAMS + ROUTER_GAUGES + AUTOSCALER_GAUGES + GPU_GAUGES + ENGINE_GAUGES
