"""OpenTelemetry spans of one request (deployments/observability/tracing.py) with the SDK's in-memory
exporter: the tree for a served, a streamed, a rejected and a timed-out request, a client's traceparent
continued, and nothing recorded without a configured exporter."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.responses import JSONResponse

from deployments.observability import tracing
from deployments.observability.tracing import RequestTrace
from deployments.router.dispatch import RequestLife
from tests.test_dispatch import make_pool, plan, replica_call, run, run_stream

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)


def tree(exporter) -> tuple[object, dict[str, object]]:
    finished = exporter.get_finished_spans()
    roots = [s for s in finished if s.name == "llm.request"]
    assert len(roots) == 1, [s.name for s in finished]
    root = roots[0]
    children = {s.name: s for s in finished if s is not root}
    for child in children.values():
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
    return root, children


def traced_plan(pool, **kwargs):
    p = plan(pool, **kwargs)
    p.trace = RequestTrace.start({}, "chat")
    p.trace.set(**{"llm.class": p.cls.label, "llm.pool": p.pool, "llm.max_tokens": p.max_tokens})
    return p


def test_served_request(spans):
    pool = make_pool()

    async def call():
        replica_call(pool)
        return JSONResponse({"usage": {"completion_tokens": 3}})

    assert run(RequestLife(traced_plan(pool), pool).run(call)).status_code == 200
    root, children = tree(spans)
    assert set(children) == {"router.admission", "router.queue", "router.replica_call"}
    assert root.attributes["llm.outcome"] == "200" and root.attributes["llm.reason"] == "ok"
    assert root.attributes["llm.class"] == "high" and root.attributes["llm.pool"] == "main"
    assert root.attributes["llm.output_tokens"] == 3


def test_streamed_request_marks_its_first_token(spans):
    pool = make_pool()
    run_stream(traced_plan(pool, stream=True), pool, [
        'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
        'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        "data: [DONE]\n\n"])
    root, children = tree(spans)
    assert set(children) == {"router.admission", "router.queue", "router.replica_call", "router.stream"}
    assert [e.name for e in root.events] == ["first_token"]
    assert children["router.stream"].start_time >= children["router.replica_call"].end_time
    assert root.attributes["llm.outcome"] == "200" and root.attributes["llm.output_tokens"] == 1


def test_rejected_request(spans):
    pool = make_pool(ready=False)

    async def never():
        raise AssertionError("the replica must not be called")

    assert run(RequestLife(traced_plan(pool), pool).run(never)).status_code == 503
    root, children = tree(spans)
    assert set(children) == {"router.admission"}
    assert root.attributes["llm.outcome"] == "503" and root.attributes["llm.reason"] == "loading"
    assert root.status.status_code.name == "ERROR"


def test_timed_out_request(spans):
    pool = make_pool()

    async def slow():
        replica_call(pool)
        await asyncio.sleep(5)

    assert run(RequestLife(traced_plan(pool, timeout="1"), pool).run(slow)).status_code == 504
    root, children = tree(spans)
    assert set(children) == {"router.admission", "router.queue", "router.replica_call"}
    assert root.attributes["llm.outcome"] == "504" and root.attributes["llm.reason"] == "client_timeout"


def test_a_clients_traceparent_is_continued(spans):
    trace = RequestTrace.start({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, "chat")
    trace.finish(200, "ok")
    root = spans.get_finished_spans()[0]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert format(root.parent.span_id, "016x") == PARENT_ID and root.parent.is_remote


def test_without_an_exporter_nothing_records(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    tracing.use_provider(None)
    trace = RequestTrace.start({}, "chat")
    assert not trace.recording
    trace.begin("router.queue")
    trace.finish(200, "ok")


# --- the LLM replica's span -------------------------------------------------------------------------

async def _outputs(items, pause_s: float = 0.0, yielded_ns: list | None = None):
    for item in items:
        await asyncio.sleep(pause_s)
        if yielded_ns is not None:
            yielded_ns.append(time.time_ns())
        yield item


async def _drain(stream) -> list:
    return [item async for item in stream]


def test_the_replica_span_ends_at_the_first_output_and_the_stream_is_unchanged(spans):
    yielded_ns: list[int] = []
    stream = tracing.trace_first_output(_outputs(["a", "b", "c"], pause_s=0.01, yielded_ns=yielded_ns))
    assert asyncio.run(_drain(stream)) == ["a", "b", "c"]
    (span,) = spans.get_finished_spans()
    assert span.name == tracing.REPLICA_FIRST_OUTPUT
    assert span.attributes[tracing.SERVE_REQUEST_ID] == ""  # outside a Serve request
    assert "llm.outcome" not in span.attributes
    assert span.start_time <= yielded_ns[0] <= span.end_time <= yielded_ns[1]  # ended at the first item


def test_a_stream_that_ends_without_output_says_so(spans):
    assert asyncio.run(_drain(tracing.trace_first_output(_outputs([])))) == []
    (span,) = spans.get_finished_spans()
    assert span.attributes["llm.outcome"] == "no_output"


def test_a_stream_closed_before_its_first_output_ends_its_span(spans):
    async def close_early():
        stream = tracing.trace_first_output(_outputs(["a"], pause_s=0.05))
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()

    asyncio.run(close_early())
    (span,) = spans.get_finished_spans()
    assert span.attributes["llm.outcome"] == "no_output"


def test_the_request_span_carries_the_serve_request_id(spans):
    RequestTrace.start({}, "chat").finish(200, "served")
    (root,) = spans.get_finished_spans()
    assert tracing.SERVE_REQUEST_ID in root.attributes


def test_without_an_exporter_the_replica_stream_is_not_wrapped(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    tracing.use_provider(None)
    outputs = _outputs(["a"])
    assert tracing.trace_first_output(outputs) is outputs
