"""Server reflection, under both names clients use: v1alpha and v1.

grpcio-reflection ships only v1alpha; newer grpcurl and grpcui ask v1 first. The two protocols
are the same messages with the same field numbers under another package name, so one servicer
answers both: v1 requests are read with the v1alpha message classes. So that clients can also
describe the v1 service they see listed, its descriptor is derived from v1alpha's (the package
renamed) and added to the pool the servicer answers from.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = reflection_pb2.DESCRIPTOR.package


def _v1_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor under v1's package and file name."""
    v1 = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1)
    v1.name = _V1_FILE
    v1.package = V1_SERVICE_NAME.rsplit(".", 1)[0]
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{v1.package}."
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in v1.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return v1


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_descriptor().SerializeToString())


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> list[str]:
    """Serves reflection for ``services`` (and itself, under both names); returns the names
    of the reflection services."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    names = [*services, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
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
