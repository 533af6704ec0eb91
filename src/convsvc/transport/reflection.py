"""Server reflection, under both names clients use: v1alpha and v1.

grpcio-reflection ships only v1alpha; newer grpcurl and grpcui ask v1 first. The two protocols
are the same messages with the same field numbers under another package name, so one servicer
answers both: v1 requests are read with the v1alpha message classes.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> list[str]:
    """Serves reflection for ``services`` (and itself, under both names); returns the names
    of the reflection services."""
    names = [*services, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (reflection.SERVICE_NAME, V1_SERVICE_NAME):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
    return [reflection.SERVICE_NAME, V1_SERVICE_NAME]
