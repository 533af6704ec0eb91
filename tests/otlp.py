"""A real OTLP trace receiver (gRPC) for the tracing tests, and how to point convsvc at it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.service_names: set[str] = set()
        self._arrived = asyncio.Event()

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.service_names.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def until(self, done: Callable[[list[Any]], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.spans):
                self._arrived.clear()
                await self._arrived.wait()


@asynccontextmanager
async def otlp_collector() -> AsyncIterator[tuple[Collector, int]]:
    """A Collector serving OTLP on a free loopback port."""
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(None)


def traced_server_env(port: int) -> dict[str, str]:
    """`convsvc serve`'s environment to trace and export to a collector on ``port``."""
    return {
        "CONVSVC_TRACING": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "convsvc-under-test",
    }


def trace_id_of(trace_parent: str) -> str:
    version, trace_id, span_id, flags = trace_parent.split("-")
    assert (version, len(span_id)) == ("00", 16)
    assert int(flags, 16) & 1  # sampled
    return trace_id
