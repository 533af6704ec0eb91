"""Reflection answers under v1 (newer grpcurl and grpcui) as well as v1alpha."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from convsvc.app import ConvsvcApp


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_and_describes_the_services(app: ConvsvcApp, version: str) -> None:
    assert app.server is not None
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="convsvc.v1.ConversationService"
            ),
        ]
        listed, described = [response async for response in call(iter(requests))]
        names = {s.name for s in listed.list_services_response.service}
        # Every service listed can be described (clients explore a server so).
        each = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names]
        answers = [response async for response in call(iter(each))]
    for name, answer in zip(names, answers, strict=True):
        assert answer.WhichOneof("message_response") == "file_descriptor_response", name
        defined = {
            f"{f.package}.{s.name}"
            for raw in answer.file_descriptor_response.file_descriptor_proto
            for f in [descriptor_pb2.FileDescriptorProto.FromString(raw)]
            for s in f.service
        }
        assert name in defined
    assert {
        "convsvc.v1.ConversationService",
        "convsvc.v1.AgentWorkerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    services = {s.name for f in files if f.package == "convsvc.v1" for s in f.service}
    assert "ConversationService" in services
