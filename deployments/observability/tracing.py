"""OpenTelemetry spans for one request through the router.

The tree (all children of ``llm.request``, a SERVER span that continues a client's W3C
``traceparent``)::

    llm.request            class, pool, prompt tokens, max tokens, stream, outcome, reason, tokens
      router.plan          tokens counted, class, pool, admission, budgets (ingress)
      router.admission     loading / circuit / predicted wait (dispatch)
      router.queue         waiting for a window slot
      router.replica_call  the Serve handle call to the LLM replica, until its first token (a
                           stream) or its whole answer; event ``first_token``
      router.stream        a stream after its first token, until its end

Configured only by the standard ``OTEL_*`` variables, read when the first span starts: with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, spans go to an
OTLP exporter (``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the default, or ``grpc``) in a
batch processor; ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turn it off. With none
set, the API's no-op tracer answers: a span is a shared non-recording object and costs next to
nothing. Tracing never fails a request: every entry point is wrapped.

The replica call is a span of the router's; the span context is not carried into the LLM replica
(Ray Serve's handle calls do not propagate it without Ray's own tracing hook). What is carried is Serve's
request id (the same in the router and in the LLM replica it calls; Ray Serve LLM also makes it vLLM's
request id), so the LLM replica's one span, a root span of its own trace, is joined to the request by
the attribute ``serve.request_id`` that both carry::

    llm_replica.first_output   a stream in the LLM replica: from the handle call reaching it (Ray Serve
                               LLM's stream hook) until the engine's first output (chat template,
                               tokenisation, the engine's queue and prefill); ``llm.outcome`` no_output
                               if the stream ended or was closed before any output

With ``router.replica_call``'s start and ``first_token`` event this splits a stream's TTFT into the
handle hop in, the LLM replica's and engine's work, and the hop back. The LLM replica exports only when
its own environment has the ``OTEL_*`` variables (its deployment's ``runtime_env``).
"""

from __future__ import annotations

import logging
import os
from typing import AsyncIterator, Mapping, Optional, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanKind, Status, StatusCode

logger = logging.getLogger("ray.serve")

_tracer: Optional[trace.Tracer] = None
_provider_override = None  # tests: an SDK TracerProvider with an in-memory exporter
_NOOP_SPAN = NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
_service_name = "llm-router"  # OTEL_SERVICE_NAME's default; the LLM replica names itself (use_service_name)

REPLICA_FIRST_OUTPUT = "llm_replica.first_output"
SERVE_REQUEST_ID = "serve.request_id"

T = TypeVar("T")


def use_provider(provider) -> None:
    """Send the router's spans to ``provider`` (tests); None returns to the environment's."""
    global _tracer, _provider_override
    _provider_override, _tracer = provider, None


def use_service_name(name: str) -> None:
    """The ``service.name`` this process's spans get when ``OTEL_SERVICE_NAME`` is unset; call before the
    first span."""
    global _service_name
    _service_name = name


def serve_request_id() -> str:
    """Serve's id of the request this task serves ("" outside one): the same in the router and in the
    LLM replica it calls, so it joins their spans."""
    try:
        from ray.serve import context

        request = context._serve_request_context.get()  # what Ray Serve LLM's get_serve_request_id reads
        return request.request_id if request is not None else ""
    except Exception:
        return ""


def _configure_from_env() -> None:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return  # the process configured one already
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", _service_name)})
    provider = TracerProvider(resource=resource)  # OTEL_RESOURCE_ATTRIBUTES, sampler variables: the SDK reads them
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    logger.info("tracing: OTLP (%s) to %s", protocol,
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def tracer() -> trace.Tracer:
    global _tracer
    if _tracer is None:
        if _provider_override is not None:
            _tracer = _provider_override.get_tracer("llm-serving.router")
        else:
            try:
                _configure_from_env()
            except Exception:
                logger.warning("tracing: could not configure from OTEL_* variables; tracing off", exc_info=True)
            _tracer = trace.get_tracer("llm-serving.router")
    return _tracer


class RequestTrace:
    """The spans of one request; every method is safe to call in any order, and at most once ends each."""

    def __init__(self, root):
        self.root = root
        self._context = trace.set_span_in_context(root)
        self._open: dict[str, object] = {}
        self._done = False

    @classmethod
    def start(cls, headers: Mapping[str, str], endpoint: str) -> "RequestTrace":
        try:
            parent = propagate.extract(headers) if "traceparent" in headers else None
            root = tracer().start_span("llm.request", context=parent, kind=SpanKind.SERVER,
                                       attributes={"llm.endpoint": endpoint})
            if root.is_recording():  # the request id is looked up only for a span that keeps it
                root.set_attribute(SERVE_REQUEST_ID, serve_request_id())
            return cls(root)
        except Exception:
            return cls(_NOOP_SPAN)

    @classmethod
    def disabled(cls) -> "RequestTrace":
        return cls(_NOOP_SPAN)

    @property
    def recording(self) -> bool:
        return self.root.is_recording()

    def begin(self, name: str, **attributes) -> None:
        if not self.recording:
            return
        try:
            self.end(name)
            self._open[name] = tracer().start_span(name, context=self._context, attributes=attributes or None)
        except Exception:
            pass

    def end(self, name: str, **attributes) -> None:
        span = self._open.pop(name, None)
        if span is None:
            return
        try:
            if attributes:
                span.set_attributes(attributes)
            span.end()
        except Exception:
            pass

    def event(self, name: str) -> None:
        if self.recording:
            try:
                self.root.add_event(name)
            except Exception:
                pass

    def set(self, **attributes) -> None:
        if self.recording:
            try:
                self.root.set_attributes({k: v for k, v in attributes.items() if v is not None})
            except Exception:
                pass

    def finish(self, status: int, reason: str, **attributes) -> None:
        """End every open span and the root, with the request's outcome."""
        if not self.recording or self._done:
            return
        self._done = True
        try:
            for name in list(self._open):
                self.end(name)
            self.set(**{"http.response.status_code": status, "llm.outcome": str(status), "llm.reason": reason},
                     **attributes)
            if status >= 500 or status == 504:
                self.root.set_status(Status(StatusCode.ERROR, reason))
            self.root.end()
        except Exception:
            pass


def trace_first_output(outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    """``outputs`` (an LLM replica's engine stream), timed by a ``llm_replica.first_output`` span from
    this call until its first item (module docstring). Returns ``outputs`` itself while tracing is off,
    so a stream pays for the wrapper only when spans are recorded."""
    try:
        span = tracer().start_span(REPLICA_FIRST_OUTPUT)
        if not span.is_recording():
            return outputs
        span.set_attribute(SERVE_REQUEST_ID, serve_request_id())
    except Exception:
        return outputs
    return _until_first(outputs, span)


async def _until_first(outputs: AsyncIterator[T], span) -> AsyncIterator[T]:
    ended = False
    try:
        async for item in outputs:
            if not ended:
                ended = True
                _end_quietly(span, None)
            yield item
    finally:
        if not ended:
            _end_quietly(span, "no_output")


def _end_quietly(span, outcome: Optional[str]) -> None:
    try:
        if outcome is not None:
            span.set_attribute("llm.outcome", outcome)
        span.end()
    except Exception:
        pass
