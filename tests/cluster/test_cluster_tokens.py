"""Scoped tokens across a cluster: a revocation made through one node ends the token's
streams on every node at once, and a scoped call keeps its scope when it is forwarded or
when the room it needs is on another node."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Cluster
from tests.helpers import error_info, expect_error
from tests.service.test_tokens import As, mint

TOKEN = "cluster-service-token"
READ, WRITE, ADMIN = pb.PERMISSION_READ, pb.PERMISSION_WRITE, pb.PERMISSION_ADMIN


async def ended_with(call: Any, timeout: float = 15.0) -> grpc.aio.AioRpcError:
    async with asyncio.timeout(timeout):
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("the stream ended without an error")


async def test_a_revocation_through_one_node_ends_the_token_s_streams_on_another(
    cluster: Callable[..., Cluster],
) -> None:
    group = cluster(2, CONVSVC_AUTH_TOKEN=TOKEN)
    a, b = group.nodes
    async with (
        grpc.aio.insecure_channel(a.address) as to_a,
        grpc.aio.insecure_channel(b.address) as to_b,
    ):
        service_a = As(to_a, TOKEN)
        await service_a.StartConversation(
            pb.StartConversationRequest(conversation_id="c", user_id="alice")
        )
        minted = await service_a.MintToken(
            pb.MintTokenRequest(user_id="alice", conversation_ids=["c"], permissions=[READ, WRITE])
        )
        stream = As(to_b, minted.token).StreamEvents(pb.StreamEventsRequest(conversation_id="c"))
        await stream.read()
        connect = As(to_b, minted.token).Connect()
        await connect.write(pb.ConnectRequest(open=pb.ConnectOpen(conversation_id="c")))
        assert (await connect.read()).HasField("opened")
        await service_a.RevokeToken(pb.RevokeTokenRequest(token_id=minted.token_id))
        for call in (stream, connect):
            error = await ended_with(call)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            assert error_info(error).reason == "TOKEN_REVOKED"


async def test_a_scoped_start_stops_nothing_outside_its_scope_on_any_node(
    cluster: Callable[..., Cluster],
) -> None:
    group = cluster(2, CONVSVC_AUTH_TOKEN=TOKEN)
    a, b = group.nodes
    async with (
        grpc.aio.insecure_channel(a.address) as to_a,
        grpc.aio.insecure_channel(b.address) as to_b,
    ):
        service_a = As(to_a, TOKEN)
        await service_a.StartConversation(
            pb.StartConversationRequest(conversation_id="X", user_id="alice")
        )
        await service_a.CloseConversation(pb.CloseConversationRequest(conversation_id="X"))
        for cid in ("Y0", "Y1", "Y2"):  # alice's limit, all on node A
            await service_a.StartConversation(
                pb.StartConversationRequest(conversation_id=cid, user_id="alice")
            )
        token = await mint(service_a, "alice", ["X"], READ, WRITE, ADMIN)
        # Through node B: the room X needs is on node A, and the token does not cover it.
        await expect_error(
            As(to_b, token).StartConversation(pb.StartConversationRequest(conversation_id="X")),
            grpc.StatusCode.PERMISSION_DENIED,
            "TOKEN_SCOPE",
        )
        await expect_error(
            As(to_b, token).JoinConversation(
                pb.JoinConversationRequest(conversation_id="X", connection_id="tab")
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "TOKEN_SCOPE",
        )
        listed = await service_a.ListConversations(pb.ListConversationsRequest(user_id="alice"))
        assert {c.conversation_id for c in listed.conversations} == {"Y0", "Y1", "Y2"}
        # A call forwarded to the owner carries the token, and its scope holds there: X runs
        # on node A, where the connection CY watches Y1.
        await service_a.StartConversation(
            pb.StartConversationRequest(conversation_id="X", user_id="alice", request_id="x")
        )
        await service_a.JoinConversation(
            pb.JoinConversationRequest(conversation_id="Y1", connection_id="CY", user_id="alice")
        )
        await expect_error(
            As(to_b, token).JoinConversation(
                pb.JoinConversationRequest(conversation_id="X", connection_id="CY")
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "TOKEN_SCOPE",
        )
        connections = await service_a.ListConnections(pb.ListConnectionsRequest(user_id="alice"))
        assert {c.connection_id: c.conversation_id for c in connections.connections} == {"CY": "Y1"}
