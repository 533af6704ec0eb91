"""OpenTelemetry with real parts: `convsvc serve` exports its spans over OTLP to a real gRPC
OTLP receiver, and one trace runs from a client's span through the call into the agent loop,
its id stored with the events the call caused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from convclient import AsyncConvsvcClient, Event
from tests.otlp import Collector, trace_id_of, traced_server_env

HI = {"action": "message", "args": {"content": "traced hi"}}


async def test_one_trace_from_the_caller_through_convsvc_into_the_agent_loop(
    collector: tuple[Collector, int], server_process: Callable[..., Any]
) -> None:
    receiver, port = collector
    address = server_process(traced_server_env(port)).start()
    # The caller's own tracer (the web tier's, say): its span is the root of the trace.
    tracer = TracerProvider().get_tracer("test-web-tier")
    events: list[Event] = []
    async with AsyncConvsvcClient(address=address, tracing=True) as client:
        await client.start_conversation("traced")
        with tracer.start_as_current_span("browser sends a message") as root:
            sent = await client.send_event(HI, conversation_id="traced")
        async with asyncio.timeout(20):
            async for batch in client.tail_events("traced"):
                events += batch.events
                if any(
                    e.payload.get("message") == "traced hi" and e.source == "agent" for e in events
                ):
                    break
    root_trace = f"{root.get_span_context().trace_id:032x}"
    root_span = f"{root.get_span_context().span_id:016x}"

    # The events the call caused carry its trace: the user's message and the agent's answer.
    user_event = next(e for e in events if e.id == sent.event_id)
    answer = next(e for e in events if e.source == "agent" and e.name == "message")
    assert trace_id_of(user_event.trace_parent) == root_trace
    assert trace_id_of(answer.trace_parent) == root_trace
    # The start's events belong to the start call's own trace.
    started = {trace_id_of(e.trace_parent) for e in events if e.id < sent.event_id}
    assert len(started) == 1 and root_trace not in started

    # convsvc exported the call's span (a child of the caller's) and the agent's span.
    def found(spans: list[Any]) -> bool:
        names = {s.name for s in spans if s.trace_id.hex() == root_trace}
        return {"/convsvc.v1.ConversationService/SendEvent", "agent.user_event"} <= names

    await receiver.until(found)
    assert receiver.service_names == {"convsvc-under-test"}
    in_trace = {s.name: s for s in receiver.spans if s.trace_id.hex() == root_trace}
    call = in_trace["/convsvc.v1.ConversationService/SendEvent"]
    agent = in_trace["agent.user_event"]
    assert call.parent_span_id.hex() == root_span
    assert agent.parent_span_id == call.span_id  # the loop continued the call's trace
    attributes = {a.key: a.value.string_value for a in agent.attributes}
    assert attributes["convsvc.conversation_id"] == "traced"
    assert user_event.trace_parent.split("-")[2] == call.span_id.hex()
