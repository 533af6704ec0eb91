"""Run control of conversations on agent workers: a control reaches the worker as the user
event OpenHands' browser sends (a delivery of ``change_agent_state``), and the worker answers
by logging it and reporting the agent's new state. A worker that does not answer gets its
conversation reported (a status update, AGENT_UNRESPONSIVE), not a hung call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from convclient import AsyncConvsvcClient, BusyPolicy, FailedPreconditionError
from convclient.structs import dict_to_struct
from convsvc.app import ConvsvcApp
from convsvc.config import EngineConfig
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import agent_state_is, error_info, grpc_events_until, log_violations
from tests.workers.conftest import (
    FAST_LIVENESS,
    ScriptedWorker,
    WorkerProcess,
    attached,
)
from tests.workers.test_worker_protocol import assigned_worker, events

THINKING = {"echo_reply_delay_seconds": 600}


def proposed(command: str) -> Callable[[list[dict[str, Any]]], bool]:
    """True once the log holds ``command`` proposed and awaiting confirmation."""
    return lambda payloads: any(
        p.get("args", {}).get("confirmation_state") == "awaiting_confirmation"
        and p["args"].get("command") == command
        for p in payloads
    )


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


async def test_pause_resume_and_interrupt_reach_a_worker_s_agent(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    start_worker(worker_app.server.address, "w1")
    await attached(worker_app, "w1")
    async with AsyncConvsvcClient(address=worker_app.server.address) as client:
        await client.start_conversation("c", agent="worker-echo", settings=THINKING)
        await client.send_event(message("first"), conversation_id="c")
        await grpc_events_until(stub, "c", agent_state_is("running"), timeout=30)

        assert (await client.pause_agent("c")).agent_state == "paused"
        assert (await client.resume_agent("c")).agent_state == "running"
        with pytest.raises(FailedPreconditionError) as refused:
            await client.send_event(
                message("refused"), conversation_id="c", busy_policy=BusyPolicy.REJECT
            )
        assert refused.value.reason == "CONVERSATION_BUSY"
        sent = await client.send_event(
            message("urgent"), conversation_id="c", busy_policy=BusyPolicy.INTERRUPT
        )
        payloads = await grpc_events_until(
            stub, "c", lambda p: any(x.get("id") == sent.event_id for x in p), timeout=30
        )
    assert not log_violations(payloads)
    states = [p["args"]["agent_state"] for p in payloads if p.get("action") == "change_agent_state"]
    assert states == ["paused", "running", "stopped"]
    assert [p["args"]["content"] for p in payloads if p.get("action") == "message"] == [
        "first",
        "urgent",
    ]
    assert not [p for p in payloads if p.get("source") == "agent"]  # interrupted each time


async def busy_on_a_scripted_worker(
    channel: grpc.aio.Channel, stub: pb_grpc.ConversationServiceStub
) -> tuple[ScriptedWorker, Any]:
    """Conversation c1 on a scripted worker whose agent reported "running" (and will report
    nothing unless the test says so)."""
    worker = ScriptedWorker(channel)
    worker.hello("mute")
    await worker.receive("welcome")
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", agent="worker-echo")
    )
    assign = await worker.receive("assign")
    await worker.receive("history")
    running = {"observation": "agent_state_changed", "extras": {"agent_state": "running"}}
    worker.send(events("c1", assign.assignment, (assign.next_event_id, "agent", running)))
    await grpc_events_until(stub, "c1", agent_state_is("running"))
    return worker, assign


async def test_a_worker_that_does_not_answer_a_control_gets_its_conversation_reported(
    tmp_path: Path,
) -> None:
    engine = EngineConfig(control_timeout_seconds=1.0)
    async with running_app(tmp_path / "data", workers=FAST_LIVENESS, engine=engine) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            worker, _ = await busy_on_a_scripted_worker(channel, stub)
            status = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="c1", start_id=0))

            with pytest.raises(grpc.aio.AioRpcError) as unanswered:
                await stub.ControlAgent(
                    pb.ControlAgentRequest(
                        conversation_id="c1", control=pb.AGENT_CONTROL_INTERRUPT
                    ),
                    timeout=30,
                )
            assert unanswered.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            info = error_info(unanswered.value)
            assert info.reason == "AGENT_UNRESPONSIVE"
            assert info.metadata["agent_state"] == "running"
            # The worker was asked: the control reached it as a delivery.
            deliver = await worker.receive("deliver")
            assert deliver.payload["action"] == "change_agent_state"
            # Everyone on the conversation is told.
            async with asyncio.timeout(10):
                async for response in status:
                    update = response.status_update
                    if update.fields["id"].string_value == "AGENT_ERROR$AGENT_UNRESPONSIVE":
                        break
            status.cancel()
            worker.close()


async def test_a_control_retried_while_its_delivery_is_on_the_way_is_delivered_once(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    running = {"observation": "agent_state_changed", "extras": {"agent_state": "running"}}
    worker.send(events("c1", assign.assignment, (assign.next_event_id, "agent", running)))
    await grpc_events_until(stub, "c1", agent_state_is("running"))
    request = pb.ControlAgentRequest(
        conversation_id="c1", control=pb.AGENT_CONTROL_PAUSE, request_id="pause-once"
    )
    first = stub.ControlAgent(request, timeout=30)
    deliver = await worker.receive("deliver")
    second = stub.ControlAgent(request, timeout=30)
    next_id = assign.next_event_id + 1
    paused = {"observation": "agent_state_changed", "extras": {"agent_state": "paused"}}
    worker.send(_logged_then(assign.assignment, next_id, deliver, paused))
    answers = [await first, await second]
    assert {a.event_id for a in answers} == {next_id}
    assert {a.agent_state for a in answers} == {"paused"}


def _logged_then(assignment: int, event_id: int, deliver: Any, state: dict[str, Any]) -> Any:
    """The worker logging a delivery, then reporting the agent's new state, in one batch."""
    return wpb.AttachRequest(
        events=wpb.LoopEvents(
            conversation_id="c1",
            assignment=assignment,
            events=[
                wpb.WorkerEvent(
                    id=event_id,
                    source="user",
                    payload=deliver.payload,
                    delivery_id=deliver.delivery_id,
                ),
                wpb.WorkerEvent(
                    id=event_id + 1, source="environment", payload=dict_to_struct(state)
                ),
            ],
        )
    )


async def test_a_close_while_a_control_waits_ends_the_wait_at_once(tmp_path: Path) -> None:
    """The control waits for a state the agent will never report: closing the conversation
    answers it (CONVERSATION_NOT_RUNNING) instead of leaving it to its timeout."""
    engine = EngineConfig(control_timeout_seconds=60.0)
    async with running_app(tmp_path / "data", workers=FAST_LIVENESS, engine=engine) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            worker, assign = await busy_on_a_scripted_worker(channel, stub)
            control = asyncio.ensure_future(
                stub.ControlAgent(
                    pb.ControlAgentRequest(conversation_id="c1", control=pb.AGENT_CONTROL_PAUSE),
                    timeout=30,
                )
            )
            deliver = await worker.receive("deliver")
            # The worker logs the control but never reports the paused state.
            worker.send(
                wpb.AttachRequest(
                    events=wpb.LoopEvents(
                        conversation_id="c1",
                        assignment=assign.assignment,
                        events=[
                            wpb.WorkerEvent(
                                id=assign.next_event_id + 1,
                                source="user",
                                payload=deliver.payload,
                                delivery_id=deliver.delivery_id,
                            )
                        ],
                    )
                )
            )
            closing = asyncio.ensure_future(
                stub.CloseConversation(pb.CloseConversationRequest(conversation_id="c1"))
            )
            stop = await worker.receive("stop")
            worker.send(
                wpb.AttachRequest(
                    released=wpb.LoopReleased(conversation_id="c1", assignment=stop.assignment)
                )
            )
            async with asyncio.timeout(10):  # far below the control timeout
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await control
            assert ended.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(ended.value).reason == "CONVERSATION_NOT_RUNNING"
            await closing
            worker.close()


async def test_an_action_awaiting_confirmation_on_a_worker_is_approved_and_rejected(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    start_worker(worker_app.server.address, "w1")
    await attached(worker_app, "w1")
    async with AsyncConvsvcClient(address=worker_app.server.address) as client:
        await client.start_conversation(
            "c", agent="worker-echo", settings={"confirmation_mode": True}
        )
        decided = []
        for command, decision in (("make", "approve"), ("rm -rf build", "reject")):
            await client.send_event(message(command), conversation_id="c")
            # OpenHands' order: the state, then the action awaiting confirmation.
            await grpc_events_until(stub, "c", proposed(command), timeout=30)
            pending = (await client.get_conversation("c")).pending_action
            assert pending is not None and pending.content == command
            result = await client.confirm_action("c", pending.event_id, decision)
            decided.append(result.agent_state)
            await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"), timeout=30)
        payloads = await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"))
    assert decided == ["user_confirmed", "user_rejected"]
    assert not log_violations(payloads)
    assert [p["content"] for p in payloads if p.get("observation") == "run"] == ["make"]
    assert [p for p in payloads if p.get("observation") == "user_rejected"]
