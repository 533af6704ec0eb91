"""Test helpers: streams read until a condition holds (with a deadline), and gRPC error checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from convclient.structs import struct_to_dict
from convsvc.agents import AgentLoop, agent_state_changed
from convsvc.codec import decode_event
from convsvc.domain import EventSource, JsonObject, StoredEvent
from convsvc.engine import ConversationEngine
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc


async def engine_events_until(
    engine: ConversationEngine,
    conversation_id: str,
    done: Callable[[list[JsonObject]], bool],
    *,
    start_id: int = 0,
    timeout: float = 10.0,
    user_id: str = "",
) -> list[JsonObject]:
    """Event payloads from the engine's stream until ``done(payloads)`` holds."""
    payloads: list[JsonObject] = []

    async def collect() -> None:
        async for batch in engine.history.stream_events(
            conversation_id=conversation_id, start_id=start_id, user_id=user_id
        ):
            for item in batch:
                if isinstance(item, StoredEvent):
                    payloads.append(decode_event(item.encoded).payload)
                else:
                    payloads.append({"status_update_item": item})
            if done(payloads):
                return

    await asyncio.wait_for(collect(), timeout)
    return payloads


async def grpc_events_until(
    stub: pb_grpc.ConversationServiceStub,
    conversation_id: str,
    done: Callable[[list[JsonObject]], bool],
    *,
    start_id: int = 0,
    timeout: float = 10.0,
    metadata: Any = None,
    **request: Any,
) -> list[JsonObject]:
    """Event payloads from StreamEvents until ``done(payloads)`` holds."""
    payloads: list[JsonObject] = []
    call = stub.StreamEvents(
        pb.StreamEventsRequest(conversation_id=conversation_id, start_id=start_id, **request),
        timeout=timeout,
        metadata=metadata,
    )
    try:
        async for response in call:
            payloads.extend(struct_to_dict(e.payload) for e in response.events)
            if response.HasField("status_update"):
                payloads.append({"status_update_item": struct_to_dict(response.status_update)})
            if done(payloads):
                return payloads
    finally:
        call.cancel()
    raise AssertionError(f"stream ended before the condition held: {payloads}")


def echo_of(content: str) -> Callable[[list[JsonObject]], bool]:
    """True once the echo agent's answer with ``content`` is among the payloads."""

    def done(payloads: list[JsonObject]) -> bool:
        return any(
            p.get("source") == "agent"
            and p.get("action") == "message"
            and p.get("message") == content
            for p in payloads
        )

    return done


def ids(payloads: list[JsonObject]) -> list[int]:
    return [p["id"] for p in payloads if "id" in p and "status_update_item" not in p]


def agent_state_is(state: str) -> Callable[[list[JsonObject]], bool]:
    """True once the newest agent state change among the payloads is ``state``."""

    def done(payloads: list[JsonObject]) -> bool:
        states = [
            p.get("extras", {}).get("agent_state")
            for p in payloads
            if p.get("observation") == "agent_state_changed"
        ]
        return bool(states) and states[-1] == state

    return done


async def engine_reports(
    engine: ConversationEngine, conversation_id: str, agent_state: str, timeout: float = 10.0
) -> None:
    """Waits, on the engine's own watch, until its view of a conversation shows the agent in
    ``agent_state``: the view the engine's rules read. A stream can show the event a moment
    earlier (its stored part reads a commit before the commit's listener has updated the
    view)."""

    async def watch() -> None:
        async for update in engine.queries.watch_conversations(conversation_ids=[conversation_id]):
            seen = [w.view for w in update.snapshot or ()]
            seen += [change.watched.view for change in update.changes]
            if any(view.agent_state == agent_state for view in seen):
                return

    await asyncio.wait_for(watch(), timeout)


async def settled(engine: ConversationEngine, conversation_id: str) -> None:
    """Waits until a conversation's agent awaits user input (its start has finished)."""
    await engine_events_until(engine, conversation_id, agent_state_is("awaiting_user_input"))


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status details")


async def expect_error(call: Any, code: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    info = error_info(caught.value)
    assert info.domain == "convsvc.v1"
    assert info.reason == reason
    details = caught.value.details() or ""
    assert "Traceback" not in details
    return details


def log_violations(payloads: list[JsonObject]) -> list[str]:
    """What is wrong with a conversation's whole log: ids must run 0, 1, 2... and agent states
    must form runs that each begin with ``loading``, with nothing but a new run after
    ``stopped`` (a crashed run may end without ``stopped``). A ``stopped`` that answers the
    user's interrupt (``change_agent_state`` to stopped) does not end the run."""
    problems: list[str] = []
    event_ids = [p.get("id") for p in payloads]
    if event_ids != list(range(len(payloads))):
        problems.append(f"ids are not 0..{len(payloads) - 1} in order: {event_ids}")
    states: list[str] = []
    previous = "stopped"
    interrupts = 0
    for payload in payloads:
        if payload.get("action") == "change_agent_state":
            interrupts += payload.get("args", {}).get("agent_state") == "stopped"
            continue
        if payload.get("observation") != "agent_state_changed":
            continue
        state = payload.get("extras", {}).get("agent_state")
        states.append(state)
        if previous == "stopped" and state != "loading":
            problems.append(f"state {state!r} at {len(states) - 1} follows 'stopped': {states}")
        previous = state
        if state == "stopped" and interrupts:
            interrupts -= 1
            previous = "interrupted"
    return problems


def lifecycle_tasks() -> list[str]:
    """Names of the engine's lifecycle tasks (agent loops, starts, closes) still pending."""
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith(("agent:", "start:", "close:")) and not task.done()
    ]


class BusyAgent(AgentLoop):
    """Stays in the ``running`` state after a message until the test releases it."""

    name = "busy"
    release: asyncio.Event

    async def start(self) -> None:
        await self.context.emit(agent_state_changed("awaiting_user_input"), EventSource.ENVIRONMENT)

    async def on_user_event(self, event: dict[str, Any]) -> None:
        await self.context.emit(agent_state_changed("running"), EventSource.ENVIRONMENT)
        await BusyAgent.release.wait()
