"""Run control over gRPC with the echo agent: pause, resume and interrupt a running agent,
what a message does while the agent is busy, and what a pointless or retried control does.

The echo agent "thinks" for ``echo_reply_delay_seconds`` before each answer: long enough here
that it is busy (state "running") whenever a test acts, and a control cuts the wait short.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from convclient import (
    AgentControl,
    AsyncConvsvcClient,
    BusyPolicy,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from convclient.structs import dict_to_struct
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import agent_state_is, expect_error, grpc_events_until

THINKING = {"echo_reply_delay_seconds": 600}
"""Longer than any test: the agent is busy until a control stops it."""


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


def replies(payloads: list[dict[str, Any]]) -> list[str]:
    return [p["args"]["content"] for p in payloads if p.get("source") == "agent"]


def controls(payloads: list[dict[str, Any]]) -> list[str]:
    return [p["args"]["agent_state"] for p in payloads if p.get("action") == "change_agent_state"]


@pytest.fixture
async def client(app: ConvsvcApp) -> AsyncIterator[AsyncConvsvcClient]:
    assert app.server is not None
    async with AsyncConvsvcClient(address=app.server.address) as connected:
        yield connected


async def busy(client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub, cid: str) -> None:
    """A conversation whose agent is thinking about its first message."""
    await client.start_conversation(cid, settings=THINKING)
    await client.send_event(message("first"), conversation_id=cid)
    await grpc_events_until(stub, cid, agent_state_is("running"))


async def test_pause_holds_the_agent_and_resume_lets_it_go_on(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await busy(client, stub, "c")
    paused = await client.pause_agent("c")
    assert paused.agent_state == "paused" and paused.event_id is not None
    # A message while paused waits; the agent answers nothing.
    await client.send_event(message("second"), conversation_id="c")
    resumed = await client.resume_agent("c")
    assert resumed.agent_state == "running" and resumed.event_id is not None
    stopped = await client.interrupt_agent("c")
    assert stopped.agent_state == "stopped"
    payloads = await grpc_events_until(stub, "c", agent_state_is("stopped"))
    assert controls(payloads) == ["paused", "running", "stopped"]
    assert replies(payloads) == []  # interrupted while thinking, both times
    # The change_agent_state events are the user's, as OpenHands' browser sends them.
    sent = [p for p in payloads if p.get("action") == "change_agent_state"]
    assert {p["source"] for p in sent} == {"user"}
    assert [p["id"] for p in sent] == [paused.event_id, resumed.event_id, stopped.event_id]


async def test_an_interrupted_agent_waits_for_the_user_and_keeps_its_history(
    tmp_path: Path,
) -> None:
    async with running_app(tmp_path / "data") as app:
        assert app.server is not None
        async with (
            AsyncConvsvcClient(address=app.server.address) as client,
            grpc.aio.insecure_channel(app.server.address) as channel,
        ):
            stub = pb_grpc.ConversationServiceStub(channel)
            await busy(client, stub, "c")
            stopped = await client.interrupt_agent("c")
            assert stopped.agent_state == "stopped"
            view = await client.get_conversation("c")
            assert view.agent_state == "stopped" and view.status == "RUNNING"
            # The next message starts it again; the history is all there.
            await client.send_event(message("again"), conversation_id="c")
            payloads = await grpc_events_until(
                stub, "c", lambda p: [x for x in p if x.get("args", {}).get("content") == "again"]
            )
            assert [p["args"]["content"] for p in payloads if p.get("action") == "message"] == [
                "first",
                "again",
            ]


async def test_a_control_with_nothing_to_do_writes_nothing(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await client.start_conversation("idle")
    await grpc_events_until(stub, "idle", agent_state_is("awaiting_user_input"))
    for control in AgentControl:
        result = await client.control_agent("idle", control)
        assert (result.event_id, result.agent_state) == (None, "awaiting_user_input")
    await busy(client, stub, "busy")
    await client.pause_agent("busy")
    again = await client.pause_agent("busy")  # already paused
    assert (again.event_id, again.agent_state) == (None, "paused")
    page = await client.search_events("busy")
    assert controls([e.payload for e in page.items]) == ["paused"]


async def test_a_retried_control_writes_its_event_once(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await busy(client, stub, "c")
    first = await client.pause_agent("c", request_id="pause-1")
    second = await client.pause_agent("c", request_id="pause-1")
    assert first == second
    page = await client.search_events("c")
    assert controls([e.payload for e in page.items]) == ["paused"]


async def test_a_message_to_a_busy_agent_waits_is_refused_or_interrupts(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await busy(client, stub, "c")
    queued = await client.send_event(message("queued"), conversation_id="c")
    with pytest.raises(FailedPreconditionError) as refused:
        await client.send_event(
            message("refused"), conversation_id="c", busy_policy=BusyPolicy.REJECT
        )
    assert refused.value.reason == "CONVERSATION_BUSY"
    assert refused.value.metadata["agent_state"] == "running"
    sent = await client.send_event(
        message("urgent"), conversation_id="c", busy_policy=BusyPolicy.INTERRUPT
    )
    payloads = await grpc_events_until(
        stub, "c", lambda p: any(x.get("id") == sent.event_id for x in p)
    )
    contents = [p["args"]["content"] for p in payloads if p.get("action") == "message"]
    assert contents == ["first", "queued", "urgent"]  # the refused one left no trace
    # The interrupt came first: the agent stopped, then the message arrived.
    interrupt = next(p for p in payloads if p.get("action") == "change_agent_state")
    assert interrupt["args"]["agent_state"] == "stopped"
    assert queued.event_id < interrupt["id"] < sent.event_id
    assert replies(payloads) == []


async def test_the_server_default_busy_policy_applies_to_sends_that_name_none(
    tmp_path: Path,
) -> None:
    async with running_app(tmp_path / "data", engine={"busy_policy": "reject"}) as app:
        assert app.server is not None
        async with (
            AsyncConvsvcClient(address=app.server.address) as client,
            grpc.aio.insecure_channel(app.server.address) as channel,
        ):
            stub = pb_grpc.ConversationServiceStub(channel)
            await busy(client, stub, "c")
            with pytest.raises(FailedPreconditionError) as refused:
                await client.send_event(message("later"), conversation_id="c")
            assert refused.value.reason == "CONVERSATION_BUSY"
            # Other user actions are not messages: no policy applies to them.
            await client.send_event({"action": "bench_note"}, conversation_id="c")
            enqueued = await client.send_event(
                message("later"), conversation_id="c", busy_policy=BusyPolicy.ENQUEUE
            )
            assert enqueued.event_id > 0


async def test_bad_controls_are_refused_precisely(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await client.start_conversation("c")
    await expect_error(
        stub.ControlAgent(pb.ControlAgentRequest(conversation_id="c")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stub.SendEvent(
            pb.SendEventRequest(conversation_id="c", busy_policy=7)  # type: ignore[arg-type]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    with pytest.raises(NotFoundError):
        await client.pause_agent("nobody")
    await client.close_conversation("c")
    with pytest.raises(FailedPreconditionError) as stopped:
        await client.interrupt_agent("c")
    assert stopped.value.reason == "CONVERSATION_NOT_RUNNING"
    with pytest.raises(InvalidArgumentError):
        await client.control_agent("", AgentControl.PAUSE)


async def test_controls_are_audited(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await busy(client, stub, "c")
    await client.pause_agent("c")
    page = await client.list_audit_entries(conversation_id="c")
    assert "ControlAgent" in [entry.method for entry in page.items]


async def test_a_connect_send_to_a_busy_agent_follows_its_busy_policy(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await busy(client, stub, "c")
    call = stub.Connect()
    await call.write(pb.ConnectRequest(open=pb.ConnectOpen(conversation_id="c")))
    assert (await call.read()).HasField("opened")
    hi = pb.ConnectSend(
        event=dict_to_struct(message("refused")),
        request_id="r1",
        busy_policy=pb.BUSY_POLICY_REJECT,
    )
    await call.write(pb.ConnectRequest(send=hi))
    while not (response := await call.read()).HasField("send_result"):
        pass
    failure = response.send_result.failure
    assert (failure.code, failure.reason) == ("FAILED_PRECONDITION", "CONVERSATION_BUSY")
    await call.done_writing()
    call.cancel()
    page = await client.search_events("c")
    assert "refused" not in [e.payload.get("args", {}).get("content") for e in page.items]


async def test_a_control_retried_after_the_agent_moved_on_answers_at_once(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await busy(client, stub, "c")
    paused = await client.pause_agent("c", request_id="pause-1")
    await client.resume_agent("c")
    async with asyncio.timeout(5):  # not the control timeout: nothing is left to wait for
        again = await client.pause_agent("c", request_id="pause-1")
    assert (again.event_id, again.agent_state) == (paused.event_id, "running")
