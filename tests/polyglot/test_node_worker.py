"""The worker protocol is language-neutral: a Node.js worker built from protos/ alone serves
an agent kind ("node-echo") end to end through a real `convsvc serve`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from convclient import AsyncConvsvcClient
from tests.otlp import Collector, trace_id_of, traced_server_env
from tests.polyglot.conftest import PROTOS


async def node_worker(
    node_client: Path, address: str, worker_id: str
) -> asyncio.subprocess.Process:
    """The Node.js echo worker, attaching to ``address`` as ``worker_id``."""
    return await asyncio.create_subprocess_exec(
        "node",
        str(node_client.parent / "echo_worker.mjs"),
        address,
        str(PROTOS),
        worker_id,
        stdout=asyncio.subprocess.PIPE,
    )


async def read_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line, "the Node worker exited"
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def test_a_node_worker_serves_a_conversation(
    node_client: Path, server_process: Callable[..., Any]
) -> None:
    address = server_process().start()
    worker = await node_worker(node_client, address, "node-1")
    try:
        attached = await read_line(worker)
        assert attached == {"step": "attached", "worker_id": "node-1"}
        async with AsyncConvsvcClient(address=address) as client:
            await client.start_conversation(
                "from-node",
                agent="node-echo",
                initial_user_message={"action": "message", "args": {"content": "first"}},
            )
            sent = await client.send_event(
                {"action": "message", "args": {"content": "second"}},
                conversation_id="from-node",
            )
            events = []
            async with asyncio.timeout(30):
                async for batch in client.tail_events("from-node"):
                    events.extend(batch.events)
                    replies = [
                        e.payload["message"]
                        for e in events
                        if e.source == "agent" and e.payload.get("action") == "message"
                    ]
                    if replies == ["first", "second"]:
                        break
            assert [e.id for e in events] == list(range(len(events)))
            assert sent.event_id in [e.id for e in events if e.source == "user"]
            closed = await client.close_conversation("from-node")
            assert closed.status.value == "STOPPED"
        released = await read_line(worker)
        assert released == {"step": "released", "conversation_id": "from-node"}
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 10)


async def test_a_traced_send_reaches_the_worker_and_its_answer_keeps_the_trace(
    node_client: Path, server_process: Callable[..., Any], collector: tuple[Collector, int]
) -> None:
    _, port = collector
    address = server_process(traced_server_env(port)).start()
    worker = await node_worker(node_client, address, "node-traced")
    try:
        await read_line(worker)  # attached
        tracer = TracerProvider().get_tracer("test-web-tier")
        async with AsyncConvsvcClient(address=address, tracing=True) as client:
            await client.start_conversation("traced-node", agent="node-echo")
            with tracer.start_as_current_span("browser sends") as root:
                sent = await client.send_event(
                    {"action": "message", "args": {"content": "hello"}},
                    conversation_id="traced-node",
                )
            events = []
            async with asyncio.timeout(30):
                async for batch in client.tail_events("traced-node", start_id=sent.event_id):
                    events.extend(batch.events)
                    if any(e.source == "agent" and e.name == "message" for e in events):
                        break
        root_trace = f"{root.get_span_context().trace_id:032x}"
        # The worker logged the user event and its answer: both carry the send's trace.
        assert trace_id_of(events[0].trace_parent) == root_trace
        answer = next(e for e in events if e.source == "agent" and e.name == "message")
        assert trace_id_of(answer.trace_parent) == root_trace
    finally:
        worker.kill()
        await worker.wait()


async def test_run_control_reaches_a_node_worker_s_agent(
    node_client: Path, server_process: Callable[..., Any]
) -> None:
    address = server_process().start()
    worker = await node_worker(node_client, address, "node-2")
    try:
        assert (await read_line(worker))["step"] == "attached"
        async with AsyncConvsvcClient(address=address) as client:
            await client.start_conversation(
                "thinking",
                agent="node-echo",
                settings={"echo_reply_delay_seconds": 600},
                initial_user_message={"action": "message", "args": {"content": "first"}},
            )
            states: list[str] = []
            async with asyncio.timeout(30):
                async for batch in client.tail_events("thinking"):
                    states += [
                        e.payload["extras"]["agent_state"]
                        for e in batch.events
                        if e.payload.get("observation") == "agent_state_changed"
                    ]
                    if "running" in states:
                        break
            assert (await client.pause_agent("thinking")).agent_state == "paused"
            assert (await client.resume_agent("thinking")).agent_state == "running"
            assert (await client.interrupt_agent("thinking")).agent_state == "stopped"
            page = await client.search_events("thinking")
            assert not [e for e in page.items if e.source == "agent"]  # interrupted: no answer
            asked = [
                e.payload["args"]["agent_state"]
                for e in page.items
                if e.payload.get("action") == "change_agent_state"
            ]
            assert asked == ["paused", "running", "stopped"]
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 10)


async def test_approvals_reach_a_node_worker_s_agent(
    node_client: Path, server_process: Callable[..., Any]
) -> None:
    address = server_process().start()
    worker = await node_worker(node_client, address, "node-3")
    try:
        assert (await read_line(worker))["step"] == "attached"
        async with AsyncConvsvcClient(address=address) as client:
            await client.start_conversation(
                "confirming", agent="node-echo", settings={"confirmation_mode": True}
            )
            decided = []
            for text, decision in (("make", "approve"), ("rm -rf out", "reject")):
                await client.send_event(
                    {"action": "message", "args": {"content": text}}, conversation_id="confirming"
                )
                async with asyncio.timeout(30):
                    async for update in client.watch_conversations(conversation_ids=["confirming"]):
                        watched = update.snapshot or [c.watched for c in update.changes]
                        pending = [w.conversation.pending_action for w in watched]
                        if any(p is not None and p.content == text for p in pending):
                            break
                action = (await client.get_conversation("confirming")).pending_action
                assert action is not None
                decided.append(
                    (
                        await client.confirm_action("confirming", action.event_id, decision)
                    ).agent_state
                )
            assert decided == ["user_confirmed", "user_rejected"]
            page = await client.search_events("confirming")
            ran = [
                e.payload["content"] for e in page.items if e.payload.get("observation") == "run"
            ]
            assert ran == ["make"]
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 10)
