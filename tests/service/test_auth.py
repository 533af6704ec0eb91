"""Bearer-token auth: every ConversationService call needs the token; health and reflection
stay open so that load balancers and grpcurl users can reach them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import expect_error, grpc_events_until

TOKEN = "s3cret-token-for-tests"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[ConvsvcApp]:
    async with running_app(tmp_path / "data", auth_token=TOKEN) as app:
        yield app


@pytest.fixture
async def channel(secured: ConvsvcApp) -> AsyncIterator[grpc.aio.Channel]:
    assert secured.server is not None
    async with grpc.aio.insecure_channel(secured.server.address) as opened:
        yield opened


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("wrong"), (("authorization", TOKEN),), bearer(TOKEN + "x")],
    ids=["none", "wrong", "no-bearer-prefix", "longer"],
)
async def test_calls_without_the_right_token_are_unauthenticated(
    channel: grpc.aio.Channel, metadata: Any
) -> None:
    stub = pb_grpc.ConversationServiceStub(channel)
    details = await expect_error(
        stub.ListConversations(pb.ListConversationsRequest(), metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    assert "Bearer" in details
    await expect_error(
        stub.StartConversation(
            pb.StartConversationRequest(conversation_id="c1"), metadata=metadata
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )


async def test_a_stream_without_the_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.ConversationServiceStub(channel)
    call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="c1"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_right_token_is_admitted(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.ConversationServiceStub(channel)
    started = await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", user_id="alice"),
        metadata=bearer(TOKEN),
    )
    assert started.conversation.conversation_id == "c1"
    payloads = await grpc_events_until(
        stub,
        "c1",
        lambda seen: any(
            p.get("extras", {}).get("agent_state") == "awaiting_user_input" for p in seen
        ),
        metadata=bearer(TOKEN),
    )
    assert payloads[0]["id"] == 0


async def test_health_and_reflection_stay_open(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(
        health_pb2.HealthCheckRequest(service="convsvc.v1.ConversationService")
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "convsvc.v1.ConversationService" in names


def test_token_file_protects_a_real_server(
    tmp_path: Path, server_process: Callable[..., Any]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(
        TOKEN + "\n"
    )  # a trailing newline, as editors write it, is not part of it
    server = server_process(extra_args=["--auth-token-file", str(token_file)])
    address = server.start()
    with grpc.insecure_channel(address) as sync_channel:
        stub = pb_grpc.ConversationServiceStub(sync_channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListConversations(pb.ListConversationsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        listed = stub.ListConversations(
            pb.ListConversationsRequest(), metadata=bearer(TOKEN), timeout=10
        )
        assert list(listed.conversations) == []
    assert TOKEN not in server.logs()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
async def test_the_scheme_is_case_insensitive(channel: grpc.aio.Channel, scheme: str) -> None:
    """RFC 7235: the auth scheme is case-insensitive (issue 8, item 9)."""
    stub = pb_grpc.ConversationServiceStub(channel)
    started = await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c1"),
        metadata=(("authorization", f"{scheme} {TOKEN}"),),
    )
    assert started.conversation.conversation_id == "c1"


@pytest.mark.parametrize(
    "value", [f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer{TOKEN}", TOKEN, "Bearer "]
)
async def test_near_misses_are_refused(channel: grpc.aio.Channel, value: str) -> None:
    stub = pb_grpc.ConversationServiceStub(channel)
    await expect_error(
        stub.GetConversation(
            pb.GetConversationRequest(conversation_id="c1"), metadata=(("authorization", value),)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
