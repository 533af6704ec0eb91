"""OpenTelemetry: spans for every call, exported over OTLP, and the trace context that travels
with events.

Off unless CONVSVC_TRACING is true. The exporter is configured by OpenTelemetry's own
variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, ...).
An event records the W3C ``traceparent`` of the call that caused it (or, for what an agent
emits while handling a user event, of that event), so a trace runs from the caller through
convsvc into the agent loop and on to whoever reads the event.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace


def configure(default_service_name: str) -> Any:
    """Installs a tracer provider exporting over OTLP; returns it (shut it down to flush).
    OTEL_SERVICE_NAME, when set, names the service instead of ``default_service_name``."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def server_interceptor() -> Any:
    """A grpc.aio server interceptor that makes a span of every call, continuing the
    caller's trace (``traceparent`` metadata)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor()  # type: ignore[no-untyped-call]


def current_trace_parent() -> str:
    """The ``traceparent`` of the span current here, or "" when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ""  # untraced (every event when tracing is off): nothing to format
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextlib.contextmanager
def within(trace_parent: str) -> Iterator[None]:
    """Makes ``trace_parent`` the current trace context for the block (without a span of
    its own): what the block appends records it."""
    if not trace_parent:
        yield
        return
    token = otel_context.attach(propagate.extract({"traceparent": trace_parent}))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def continued(trace_parent: str, span_name: str, **attributes: Any) -> Iterator[None]:
    """Runs the block in a span continuing ``trace_parent`` (no span when it is empty)."""
    if not trace_parent:
        yield
        return
    token = otel_context.attach(propagate.extract({"traceparent": trace_parent}))
    try:
        # Asked of the provider each time: the one installed by ``configure`` (or none).
        tracer = trace.get_tracer("convsvc")
        with tracer.start_as_current_span(span_name, attributes=attributes):
            yield
    finally:
        otel_context.detach(token)
