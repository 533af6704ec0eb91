"""Scoped tokens where features combine: a credential over the life of a stream, a scope
against every side effect a call can cause, and every mutation attempt in the audit log.

A real server with a service token. Alice runs Y0, Y1, Y2 (the limit is 3) and owns X, which
is stopped; her browser connection CY watches Y1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from convsvc.v1 import conversation_service_pb2 as pb
from tests.conftest import running_app
from tests.helpers import error_info, expect_error
from tests.service.test_grpc_api import message
from tests.service.test_tokens import SERVICE_TOKEN, As, mint

READ, WRITE, ADMIN = pb.PERMISSION_READ, pb.PERMISSION_WRITE, pb.PERMISSION_ADMIN
DENIED, UNAUTHENTICATED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
RUNNING = {"Y0", "Y1", "Y2"}


@pytest.fixture
async def alice(tmp_path: Path) -> AsyncIterator[tuple[As, grpc.aio.Channel]]:
    async with running_app(tmp_path / "data", auth_token=SERVICE_TOKEN) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            service = As(channel, SERVICE_TOKEN)
            await service.StartConversation(
                pb.StartConversationRequest(conversation_id="X", user_id="alice")
            )
            await service.CloseConversation(pb.CloseConversationRequest(conversation_id="X"))
            for cid in sorted(RUNNING):
                await service.StartConversation(
                    pb.StartConversationRequest(conversation_id=cid, user_id="alice")
                )
            await service.JoinConversation(
                pb.JoinConversationRequest(
                    conversation_id="Y1", connection_id="CY", user_id="alice"
                )
            )
            yield service, channel


async def ended_with(call: Any, timeout: float = 15.0) -> grpc.aio.AioRpcError:
    """Reads a stream to its end; the status it ended with."""
    async with asyncio.timeout(timeout):
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("the stream ended without an error")


async def opened(channel: grpc.aio.Channel, token: str, cid: str, connection_id: str = "") -> Any:
    connect = As(channel, token).Connect()
    await connect.write(
        pb.ConnectRequest(open=pb.ConnectOpen(conversation_id=cid, connection_id=connection_id))
    )
    return connect


async def test_a_revoked_token_ends_the_streams_it_opened_and_nothing_more_is_done(
    alice, tally
) -> None:
    service, channel = alice
    minted = await service.MintToken(
        pb.MintTokenRequest(user_id="alice", conversation_ids=["Y0"], permissions=[READ, WRITE])
    )
    browser = As(channel, minted.token)
    connect = await opened(channel, minted.token, "Y0")
    assert (await connect.read()).HasField("opened")
    await connect.write(pb.ConnectRequest(send=pb.ConnectSend(event=message("before"))))
    stream = browser.StreamEvents(pb.StreamEventsRequest(conversation_id="Y0"))
    await stream.read()
    watch = browser.WatchConversations(pb.WatchConversationsRequest())
    await watch.read()

    await service.RevokeToken(pb.RevokeTokenRequest(token_id=minted.token_id))
    for call in (connect, stream, watch):
        error = await ended_with(call)
        assert error.code() is UNAUTHENTICATED and error_info(error).reason == "TOKEN_REVOKED"
        tally.checked("tokens: a revoked token ends the streams it opened")
    # A send written after the revocation was not served.
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        await connect.write(pb.ConnectRequest(send=pb.ConnectSend(event=message("after"))))
    page = await service.SearchEvents(pb.SearchEventsRequest(conversation_id="Y0"))
    contents = [e.payload["args"]["content"] for e in page.events if "args" in e.payload]
    assert "after" not in contents


async def test_an_expiring_token_ends_its_streams_when_it_expires(alice, tally) -> None:
    service, channel = alice
    token = await mint(service, "alice", ["Y0"], READ, WRITE, ttl_seconds=2)
    connect = await opened(channel, token, "Y0")
    assert (await connect.read()).HasField("opened")
    stream = As(channel, token).StreamEvents(pb.StreamEventsRequest(conversation_id="Y0"))
    await stream.read()
    for call in (connect, stream):
        error = await ended_with(call)
        assert error.code() is UNAUTHENTICATED and error_info(error).reason == "TOKEN_EXPIRED"
        tally.checked("tokens: an expired token ends the streams it opened")


async def unchanged(service: As) -> None:
    """Nothing outside X changed: Y0..Y2 run, and CY still watches Y1."""
    listed = await service.ListConversations(pb.ListConversationsRequest(user_id="alice"))
    assert {c.conversation_id for c in listed.conversations} - {"X"} == RUNNING
    connections = await service.ListConnections(pb.ListConnectionsRequest(user_id="alice"))
    assert {c.connection_id: c.conversation_id for c in connections.connections}.get("CY") == "Y1"


def x_calls(channel: grpc.aio.Channel, token: str) -> dict[str, Callable[[], Any]]:
    """Every RPC a token for X may try, each aimed at X (and at CY where it names one)."""
    x = As(channel, token)
    return {
        "StartConversation": lambda: x.StartConversation(
            pb.StartConversationRequest(conversation_id="X")
        ),
        "StartConversation evict_oldest": lambda: x.StartConversation(
            pb.StartConversationRequest(
                conversation_id="X", admission_policy=pb.ADMISSION_POLICY_EVICT_OLDEST
            )
        ),
        "JoinConversation": lambda: x.JoinConversation(
            pb.JoinConversationRequest(conversation_id="X", connection_id="new")
        ),
        "JoinConversation moving CY": lambda: x.JoinConversation(
            pb.JoinConversationRequest(conversation_id="X", connection_id="CY")
        ),
        "SendEvent": lambda: x.SendEvent(
            pb.SendEventRequest(conversation_id="X", event=message("x"))
        ),
        "SendEvent by CY": lambda: x.SendEvent(
            pb.SendEventRequest(connection_id="CY", event=message("x"))
        ),
        "DisconnectConnection CY": lambda: x.DisconnectConnection(
            pb.DisconnectConnectionRequest(connection_id="CY")
        ),
        "CloseConversation": lambda: x.CloseConversation(
            pb.CloseConversationRequest(conversation_id="X")
        ),
        "ControlAgent": lambda: x.ControlAgent(
            pb.ControlAgentRequest(conversation_id="X", control=pb.AGENT_CONTROL_INTERRUPT)
        ),
        "ConfirmAction": lambda: x.ConfirmAction(
            pb.ConfirmActionRequest(
                conversation_id="X", action_id=0, decision=pb.APPROVAL_DECISION_APPROVE
            )
        ),
        "GetConversation": lambda: x.GetConversation(
            pb.GetConversationRequest(conversation_id="X")
        ),
        "ListConversations": lambda: x.ListConversations(pb.ListConversationsRequest()),
        "SearchConversations": lambda: x.SearchConversations(pb.SearchConversationsRequest()),
        "ForkConversation of Y0": lambda: x.ForkConversation(
            pb.ForkConversationRequest(source_conversation_id="Y0", conversation_id="X")
        ),
        "ForkConversation of X": lambda: x.ForkConversation(
            pb.ForkConversationRequest(source_conversation_id="X", conversation_id="Z")
        ),
        "UpdateConversation": lambda: x.UpdateConversation(
            pb.UpdateConversationRequest(
                conversation_id="X", labels={"k": "v"}, update_mask={"paths": ["labels"]}
            )
        ),
        "CreateWebhook": lambda: x.CreateWebhook(
            pb.CreateWebhookRequest(url="https://example.com/hook")
        ),
        "ListWebhookDeliveries": lambda: x.ListWebhookDeliveries(
            pb.ListWebhookDeliveriesRequest(conversation_id="X")
        ),
        "ListConversations awaiting": lambda: x.ListConversations(
            pb.ListConversationsRequest(agent_states=["awaiting_user_confirmation"])
        ),
        "ListConnections": lambda: x.ListConnections(pb.ListConnectionsRequest()),
        "SearchEvents": lambda: x.SearchEvents(pb.SearchEventsRequest(conversation_id="X")),
        "CompleteWithAgentLlm": lambda: x.CompleteWithAgentLlm(
            pb.CompleteWithAgentLlmRequest(conversation_id="X")
        ),
        "Heartbeat": lambda: x.Heartbeat(pb.HeartbeatRequest(client_instance_id="i")),
    }


async def outcome(call: Callable[[], Any]) -> str:
    """The status code a call answered."""
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "OK"


async def test_a_token_for_x_affects_nothing_but_x_whatever_it_calls(alice, tally) -> None:
    service, channel = alice
    token = await mint(service, "alice", ["X"], READ, WRITE, ADMIN)
    for name, call in x_calls(channel, token).items():
        code = await outcome(call)
        assert code != "UNKNOWN", name
        tally.call("scope matrix", code)
        await unchanged(service)  # no eviction, no connection moved
        # Starting X needs room Y0 would make: never granted to this token.
        if name.startswith(("StartConversation", "JoinConversation")):
            got = await service.GetConversation(pb.GetConversationRequest(conversation_id="X"))
            assert got.conversation.status == pb.CONVERSATION_STATUS_STOPPED, name
        tally.checked("scope matrix: a call affects nothing outside its token's scope")
    for connection_id in ("new", "CY"):  # Connect's open, too
        connect = await opened(channel, token, "X", connection_id)
        error = await ended_with(connect)
        assert error.code() is DENIED and error_info(error).reason == "TOKEN_SCOPE"
        await unchanged(service)


async def test_a_token_for_x_cannot_control_or_decide_for_another_conversation_s_agent(
    alice,
) -> None:
    service, channel = alice
    token = await mint(service, "alice", ["X"], READ, WRITE, ADMIN)
    before = await service.SearchEvents(pb.SearchEventsRequest(conversation_id="Y0"))
    for control in (pb.AGENT_CONTROL_PAUSE, pb.AGENT_CONTROL_INTERRUPT):
        await expect_error(
            As(channel, token).ControlAgent(
                pb.ControlAgentRequest(conversation_id="Y0", control=control)
            ),
            DENIED,
            "TOKEN_SCOPE",
        )
    await expect_error(
        As(channel, token).ConfirmAction(
            pb.ConfirmActionRequest(
                conversation_id="Y0", action_id=0, decision=pb.APPROVAL_DECISION_APPROVE
            )
        ),
        DENIED,
        "TOKEN_SCOPE",
    )
    after = await service.SearchEvents(pb.SearchEventsRequest(conversation_id="Y0"))
    assert after == before
    reader = await mint(service, "alice", ["Y0"], READ)
    await expect_error(
        As(channel, reader).ConfirmAction(
            pb.ConfirmActionRequest(
                conversation_id="Y0", action_id=0, decision=pb.APPROVAL_DECISION_REJECT
            )
        ),
        DENIED,
        "TOKEN_SCOPE",
    )
    await expect_error(
        As(channel, reader).ControlAgent(
            pb.ControlAgentRequest(conversation_id="Y0", control=pb.AGENT_CONTROL_PAUSE)
        ),
        DENIED,
        "TOKEN_SCOPE",
    )


async def test_a_token_covering_the_victim_may_cause_its_eviction(alice) -> None:
    service, channel = alice
    token = await mint(service, "alice", ["X", "Y0"], READ, WRITE, ADMIN)
    await As(channel, token).StartConversation(pb.StartConversationRequest(conversation_id="X"))
    listed = await service.ListConversations(pb.ListConversationsRequest(user_id="alice"))
    assert {c.conversation_id for c in listed.conversations} == {"X", "Y1", "Y2"}


async def test_every_mutation_attempt_leaves_one_audit_entry(alice, tally) -> None:
    service, channel = alice
    before = await service.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=1000))
    writer = await mint(service, "alice", ["Y0"], WRITE)
    reader = await mint(service, "alice", ["Y0"], READ)
    attempts = 1  # the MintToken of the writer
    attempts += 1  # and of the reader
    # Connect: opened and refused (another conversation, READ only, a forged token, no open).
    for token, cid in ((writer, "Y0"), (writer, "Y1"), (reader, "Y0"), ("not.a.token", "Y0")):
        connect = await opened(channel, token, cid)
        if token is writer and cid == "Y0":
            assert (await connect.read()).HasField("opened")
            await connect.write(pb.ConnectRequest(send=pb.ConnectSend(event=message("hi"))))
            assert (await connect.read()).HasField("send_result")
            await connect.done_writing()
            await ended_with_ok(connect)
            attempts += 3  # its join, its send and its disconnect
        else:
            await ended_with(connect)
            attempts += 1
    no_open = As(channel, writer).Connect()
    await no_open.write(pb.ConnectRequest(send=pb.ConnectSend(event=message("first"))))
    await ended_with(no_open)
    attempts += 1
    # A send whose caller gives up before its answer (a queued start, here).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.StartConversation(
            pb.StartConversationRequest(
                conversation_id="Z",
                user_id="alice",
                admission_policy=pb.ADMISSION_POLICY_QUEUE,
            ),
            timeout=0.5,
        )
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    attempts += 1
    # Run control: answered (nothing to interrupt is still an attempt) and refused (READ).
    interrupt = pb.ControlAgentRequest(conversation_id="Y0", control=pb.AGENT_CONTROL_INTERRUPT)
    await As(channel, writer).ControlAgent(interrupt)
    with pytest.raises(grpc.aio.AioRpcError):
        await As(channel, reader).ControlAgent(interrupt)
    attempts += 2
    # Approvals: refused (nothing pending; READ only): each is still an attempt.
    decide = pb.ConfirmActionRequest(
        conversation_id="Y0", action_id=0, decision=pb.APPROVAL_DECISION_APPROVE
    )
    for token in (writer, reader):
        with pytest.raises(grpc.aio.AioRpcError):
            await As(channel, token).ConfirmAction(decide)
    attempts += 2
    # Labels: changed (WRITE) and refused (READ); a fork (ADMIN needed: refused); webhooks
    # (the service token's): registered and deleted.
    relabel = pb.UpdateConversationRequest(
        conversation_id="Y0", labels={"k": "v"}, update_mask={"paths": ["labels"]}
    )
    await As(channel, writer).UpdateConversation(relabel)
    with pytest.raises(grpc.aio.AioRpcError):
        await As(channel, reader).UpdateConversation(relabel)
    with pytest.raises(grpc.aio.AioRpcError):
        await As(channel, writer).ForkConversation(
            pb.ForkConversationRequest(source_conversation_id="Y0", conversation_id="Y0-fork")
        )
    with pytest.raises(grpc.aio.AioRpcError):  # a loopback endpoint is refused, and audited
        await service.CreateWebhook(pb.CreateWebhookRequest(url="http://127.0.0.1/"))
    await service.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id="wh_none"))
    attempts += 5
    await service.GetConversation(pb.GetConversationRequest(conversation_id="Y0"))  # a read

    after = await service.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=1000))
    new = after.entries[len(before.entries) :]
    assert len(new) == attempts, [(e.method, e.code, e.reason) for e in new]
    assert {(e.method, e.code) for e in new} >= {
        ("JoinConversation", "PERMISSION_DENIED"),
        ("Connect", "UNAUTHENTICATED"),
        ("Connect", "INVALID_ARGUMENT"),
        ("StartConversation", "DEADLINE_EXCEEDED"),
        ("ConfirmAction", "FAILED_PRECONDITION"),
        ("ConfirmAction", "PERMISSION_DENIED"),
        ("UpdateConversation", "OK"),
        ("UpdateConversation", "PERMISSION_DENIED"),
        ("ForkConversation", "PERMISSION_DENIED"),
        ("CreateWebhook", "INVALID_ARGUMENT"),
        ("DeleteWebhook", "OK"),
    }
    tally.checked("audit: one entry per mutation attempted", attempts)


async def ended_with_ok(call: Any) -> None:
    async with asyncio.timeout(15):
        while await call.read() is not grpc.aio.EOF:
            pass


async def test_a_call_may_not_ask_for_more_evictions_than_the_server_allows(
    tmp_path: Path, tally
) -> None:
    async with running_app(
        tmp_path / "data", auth_token=SERVICE_TOKEN, engine={"admission_policy": "reject"}
    ) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            service = As(channel, SERVICE_TOKEN)
            for cid in sorted(RUNNING):
                await service.StartConversation(
                    pb.StartConversationRequest(conversation_id=cid, user_id="alice")
                )
            everything = await mint(service, "alice", [], READ, WRITE, ADMIN)
            for caller in (As(channel, everything), service):
                await expect_error(
                    caller.StartConversation(
                        pb.StartConversationRequest(
                            conversation_id="X",
                            user_id="" if caller is not service else "alice",
                            admission_policy=pb.ADMISSION_POLICY_EVICT_OLDEST,
                        )
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "ADMISSION_POLICY_OVERRIDE_NOT_ALLOWED",
                )
                listed = await service.ListConversations(
                    pb.ListConversationsRequest(user_id="alice")
                )
                assert {c.conversation_id for c in listed.conversations} == RUNNING
                tally.checked("scope matrix: a call affects nothing outside its token's scope")


async def test_a_token_for_x_finds_and_relabels_only_x(alice) -> None:
    service, channel = alice
    token = await mint(service, "alice", ["X"], READ, WRITE)
    found = await As(channel, token).SearchConversations(pb.SearchConversationsRequest())
    assert {c.conversation_id for c in found.conversations} <= {"X"}
    await expect_error(
        As(channel, token).SearchConversations(
            pb.SearchConversationsRequest(conversation_ids=["Y0"])
        ),
        DENIED,
        "TOKEN_SCOPE",
    )
    await expect_error(
        As(channel, token).UpdateConversation(
            pb.UpdateConversationRequest(
                conversation_id="Y0", title="mine", update_mask={"paths": ["title"]}
            )
        ),
        DENIED,
        "TOKEN_SCOPE",
    )
    y0 = await service.GetConversation(pb.GetConversationRequest(conversation_id="Y0"))
    assert y0.conversation.title == ""


async def test_webhooks_are_the_operator_s_not_a_token_s(alice) -> None:
    service, channel = alice
    token = await mint(service, "alice", [], READ, WRITE, ADMIN)  # all of alice's
    for call in (
        As(channel, token).CreateWebhook(pb.CreateWebhookRequest(url="https://example.com/")),
        As(channel, token).ListWebhooks(pb.ListWebhooksRequest()),
        As(channel, token).DeleteWebhook(pb.DeleteWebhookRequest(webhook_id="wh_x")),
        As(channel, token).ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest()),
    ):
        await expect_error(call, DENIED, "TOKEN_SCOPE")
