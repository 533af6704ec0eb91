"""Isolation probes: user B aims every RPC at user A's conversation, connection and request
ids. Each probe must answer as if A's things did not exist, and leave them untouched.

The table is checked against the service descriptor, so a new RPC fails this test until it
has a probe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import agent_state_is, error_info, grpc_events_until

A, B = "user-a", "user-b"
HI = struct_pb2.Struct()
HI.update({"action": "message", "args": {"content": "hi"}})

Probe = Callable[[pb_grpc.ConversationServiceStub], Awaitable[Any]]


async def drain(call: Any) -> list[Any]:
    return [response async for response in call]


PROBES: dict[str, list[tuple[str, Probe, set[str]]]] = {
    # method -> [(what, call made for B, reasons allowed)]; "" means the call may succeed
    # but must not reveal or change A's things (checked afterwards).
    "StartConversation": [
        ("start A's id", lambda s: s.StartConversation(
            pb.StartConversationRequest(conversation_id="a-conv", user_id=B)),
         {"CONVERSATION_NOT_FOUND"}),
        ("A's request id", lambda s: s.StartConversation(
            pb.StartConversationRequest(user_id=B, request_id="a-req")), {""}),
    ],
    "ForkConversation": [
        ("fork A's conversation", lambda s: s.ForkConversation(pb.ForkConversationRequest(
            source_conversation_id="a-conv", user_id=B, conversation_id="b-fork")),
         {"CONVERSATION_NOT_FOUND"}),
        ("fork into A's id", lambda s: s.ForkConversation(pb.ForkConversationRequest(
            source_conversation_id="b-conv", user_id=B, conversation_id="a-conv")),
         {"CONVERSATION_NOT_FOUND", "CONVERSATION_EXISTS"}),
    ],
    "JoinConversation": [
        ("join A's id", lambda s: s.JoinConversation(pb.JoinConversationRequest(
            conversation_id="a-conv", connection_id="b-conn", user_id=B)),
         {"CONVERSATION_NOT_FOUND"}),
        ("take A's connection id", lambda s: s.JoinConversation(pb.JoinConversationRequest(
            conversation_id="b-conv", connection_id="a-conn", user_id=B)),
         {"CONNECTION_ID_TAKEN"}),
    ],
    "ControlAgent": [
        ("interrupt A's agent", lambda s: s.ControlAgent(pb.ControlAgentRequest(
            conversation_id="a-conv", user_id=B, control=pb.AGENT_CONTROL_INTERRUPT)),
         {"CONVERSATION_NOT_FOUND"}),
        ("pause A's agent with A's request id", lambda s: s.ControlAgent(
            pb.ControlAgentRequest(conversation_id="a-conv", user_id=B,
                                   control=pb.AGENT_CONTROL_PAUSE, request_id="a-req")),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "ConfirmAction": [
        ("approve A's action", lambda s: s.ConfirmAction(pb.ConfirmActionRequest(
            conversation_id="a-conv", user_id=B, action_id=0,
            decision=pb.APPROVAL_DECISION_APPROVE)),
         {"CONVERSATION_NOT_FOUND"}),
        ("reject A's action with A's request id", lambda s: s.ConfirmAction(
            pb.ConfirmActionRequest(conversation_id="a-conv", user_id=B, action_id=0,
                                    decision=pb.APPROVAL_DECISION_REJECT, request_id="a-req")),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "SendEvent": [
        ("send to A's id", lambda s: s.SendEvent(
            pb.SendEventRequest(conversation_id="a-conv", user_id=B, event=HI)),
         {"CONVERSATION_NOT_FOUND"}),
        ("send by A's connection", lambda s: s.SendEvent(
            pb.SendEventRequest(connection_id="a-conn", user_id=B, event=HI)),
         {"CONNECTION_NOT_FOUND"}),
    ],
    "DisconnectConnection": [
        ("drop A's connection", lambda s: s.DisconnectConnection(
            pb.DisconnectConnectionRequest(connection_id="a-conn", user_id=B)), {""}),
    ],
    "CloseConversation": [
        ("close A's id", lambda s: s.CloseConversation(
            pb.CloseConversationRequest(conversation_id="a-conv", user_id=B)),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "GetConversation": [
        ("read A's id", lambda s: s.GetConversation(
            pb.GetConversationRequest(conversation_id="a-conv", user_id=B)),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "ListConversations": [
        ("list A's id", lambda s: s.ListConversations(
            pb.ListConversationsRequest(user_id=B, conversation_ids=["a-conv"])), {""}),
    ],
    "SearchConversations": [
        ("search A's id", lambda s: s.SearchConversations(
            pb.SearchConversationsRequest(user_id=B, conversation_ids=["a-conv"])), {""}),
        ("search everything", lambda s: s.SearchConversations(
            pb.SearchConversationsRequest(user_id=B)), {""}),
    ],
    "UpdateConversation": [
        ("relabel A's id", lambda s: s.UpdateConversation(pb.UpdateConversationRequest(
            conversation_id="a-conv", user_id=B, labels={"owner": "b"},
            update_mask={"paths": ["labels", "title"]}, title="B's now")),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "ListConnections": [
        ("list A's connections", lambda s: s.ListConnections(
            pb.ListConnectionsRequest(user_id=B, conversation_ids=["a-conv"])), {""}),
    ],
    "SearchEvents": [
        ("search A's log", lambda s: s.SearchEvents(
            pb.SearchEventsRequest(conversation_id="a-conv", user_id=B)),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "StreamEvents": [
        ("tail A's log", lambda s: drain(s.StreamEvents(
            pb.StreamEventsRequest(conversation_id="a-conv", user_id=B))),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "CompleteWithAgentLlm": [
        ("ask A's agent", lambda s: s.CompleteWithAgentLlm(
            pb.CompleteWithAgentLlmRequest(conversation_id="a-conv", user_id=B, messages=[HI])),
         {"CONVERSATION_NOT_FOUND"}),
    ],
    "Heartbeat": [
        # Instance ids are the web tier's capabilities: a user never learns them (see the
        # listing check below), so a heartbeat cannot be aimed at A's web process.
        ("beat an unknown instance", lambda s: s.Heartbeat(
            pb.HeartbeatRequest(client_instance_id="guessed")), {""}),
    ],
    "WatchConversations": [
        ("watch A's id", lambda s: first_response(s.WatchConversations(
            pb.WatchConversationsRequest(user_id=B, conversation_ids=["a-conv"]))), {""}),
    ],
    "Connect": [
        ("connect to A's id", lambda s: connect(s, pb.ConnectOpen(
            conversation_id="a-conv", connection_id="b-conn", user_id=B)),
         {"CONVERSATION_NOT_FOUND"}),
        ("take A's connection id", lambda s: connect(s, pb.ConnectOpen(
            conversation_id="b-conv", connection_id="a-conn", user_id=B)),
         {"CONNECTION_ID_TAKEN"}),
    ],
    # Without a signing key (this server has no service token) no token is minted; scoped
    # tokens' boundaries are probed in tests/service/test_tokens.py.
    "MintToken": [
        ("mint a token for A", lambda s: s.MintToken(
            pb.MintTokenRequest(user_id=A, permissions=[pb.PERMISSION_READ])),
         {"TOKENS_NOT_CONFIGURED"}),
    ],
    "RevokeToken": [
        ("revoke a guessed token", lambda s: s.RevokeToken(
            pb.RevokeTokenRequest(token_id="guessed")), {"TOKENS_NOT_CONFIGURED"}),
    ],
    "ListAuditEntries": [
        ("B's entries about A's id", lambda s: s.ListAuditEntries(
            pb.ListAuditEntriesRequest(user_id=B, conversation_id="a-conv")), {""}),
    ],
    # Webhooks are the operator's (service token only; this server trusts every caller):
    # nothing registered shows anything of A, and no endpoint may point into the network.
    "CreateWebhook": [
        ("point a webhook at the server's own network", lambda s: s.CreateWebhook(
            pb.CreateWebhookRequest(url="http://127.0.0.1:1/steal")),
         {"WEBHOOK_TARGET_NOT_ALLOWED", "WEBHOOKS_NOT_CONFIGURED"}),
    ],
    "ListWebhooks": [
        ("list endpoints", lambda s: s.ListWebhooks(pb.ListWebhooksRequest()),
         {"", "WEBHOOKS_NOT_CONFIGURED"}),
    ],
    "DeleteWebhook": [
        ("delete a guessed endpoint", lambda s: s.DeleteWebhook(
            pb.DeleteWebhookRequest(webhook_id="wh_guessed")), {"", "WEBHOOKS_NOT_CONFIGURED"}),
    ],
    "ListWebhookDeliveries": [
        ("deliveries about A's id", lambda s: s.ListWebhookDeliveries(
            pb.ListWebhookDeliveriesRequest(conversation_id="a-conv")),
         {"", "WEBHOOKS_NOT_CONFIGURED"}),
    ],
    # The operator's view of the workers (service token only; this server trusts every
    # caller): no worker is attached here, and listing them changes nothing.
    "ListWorkers": [
        ("list the workers and what they run", lambda s: s.ListWorkers(pb.ListWorkersRequest()),
         {""}),
    ],
}  # fmt: skip


async def first_response(call: Any) -> Any:
    """The first answer of a stream (a watch's snapshot), then the stream is cancelled."""
    try:
        return await call.read()
    finally:
        call.cancel()


async def connect(stub: pb_grpc.ConversationServiceStub, opening: pb.ConnectOpen) -> Any:
    call = stub.Connect()
    try:
        await call.write(pb.ConnectRequest(open=opening))
        return await call.read()
    finally:
        call.cancel()


def test_every_rpc_has_a_probe() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["ConversationService"].methods}
    assert set(PROBES) == methods


@pytest.fixture
async def a_owns_things(stub: pb_grpc.ConversationServiceStub) -> pb_grpc.ConversationServiceStub:
    await stub.JoinConversation(
        pb.JoinConversationRequest(
            conversation_id="a-conv", connection_id="a-conn", user_id=A,
            client_instance_id="web-1", request_id="a-req",
        )
    )  # fmt: skip
    await grpc_events_until(stub, "a-conv", agent_state_is("awaiting_user_input"), user_id=A)
    return stub


@pytest.mark.parametrize(
    ("method", "index"), [(m, i) for m, probes in PROBES.items() for i in range(len(probes))]
)
async def test_a_probe_from_another_user_finds_nothing_and_changes_nothing(
    a_owns_things: pb_grpc.ConversationServiceStub, tally, method: str, index: int
) -> None:
    stub = a_owns_things
    what, probe, allowed = PROBES[method][index]
    before = await stub.GetConversation(pb.GetConversationRequest(conversation_id="a-conv"))
    outcome = ""
    response: Any = None
    try:
        response = await probe(stub)
        tally.call("isolation", "OK")
    except grpc.aio.AioRpcError as exc:
        tally.call("isolation", exc.code().name)
        outcome = error_info(exc).reason
    assert outcome in allowed, (what, outcome)
    if isinstance(response, pb.ListConversationsResponse | pb.SearchConversationsResponse):
        assert not response.conversations, what
    if isinstance(response, pb.ListConnectionsResponse):
        assert not response.connections, what
    if isinstance(response, pb.StartConversationResponse):
        assert response.conversation.conversation_id != "a-conv", what
    if isinstance(response, pb.DisconnectConnectionResponse):
        assert not response.removed, what
    if isinstance(response, pb.WatchConversationsResponse):
        assert response.snapshot_complete and not response.snapshot, what
    if isinstance(response, pb.ListAuditEntriesResponse):
        assert not response.entries, what
    if isinstance(response, pb.ListWebhooksResponse):
        assert not response.webhooks, what
    if isinstance(response, pb.ListWebhookDeliveriesResponse):
        assert not response.deliveries, what
    if isinstance(response, pb.DeleteWebhookResponse):
        assert not response.removed, what
    if isinstance(response, pb.ListWorkersResponse):
        assert not any("a-conv" in w.conversation_ids for w in response.workers), what
    assert not isinstance(response, pb.ConnectResponse), what  # never opened
    # A's conversation and connection are as they were.
    after = await stub.GetConversation(pb.GetConversationRequest(conversation_id="a-conv"))
    assert after.conversation.status == before.conversation.status
    assert after.conversation.latest_event_id == before.conversation.latest_event_id
    assert after.conversation.user_id == A
    assert (after.conversation.title, dict(after.conversation.labels)) == ("", {})
    (connection,) = (
        await stub.ListConnections(pb.ListConnectionsRequest(conversation_ids=["a-conv"]))
    ).connections
    assert (connection.connection_id, connection.user_id) == ("a-conn", A)
    # And A's own user-scoped listing does not name the web process that holds it.
    (mine,) = (await stub.ListConnections(pb.ListConnectionsRequest(user_id=A))).connections
    assert mine.client_instance_id == ""
    tally.checked("isolation: probe saw nothing and changed nothing")
