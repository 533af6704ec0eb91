"""Workers that break the protocol: each is detached with a precise status, and nothing it
sent wrongly enters a log. A scripted client plays the worker, message by message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.app import ConvsvcApp
from convsvc.config import EngineConfig, WorkersConfig
from convsvc.errors import ResourceExhausted
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from convsvc.workers.messages import DeliverMessage, StopMessage
from convsvc.workers.pool import WorkerPool
from tests.conftest import running_app
from tests.helpers import (
    agent_state_is,
    error_info,
    expect_error,
    grpc_events_until,
    log_violations,
)
from tests.workers.conftest import FAST_LIVENESS, ScriptedWorker, attached

STATE = {"observation": "agent_state_changed", "content": "", "extras": {"agent_state": "x"}}


def logged(cid: str, assignment: int, event_id: int, payload: Any, delivery_id: str) -> Any:
    """The worker logging a delivered user event under ``event_id``."""
    return wpb.AttachRequest(
        events=wpb.LoopEvents(
            conversation_id=cid,
            assignment=assignment,
            events=[
                wpb.WorkerEvent(
                    id=event_id, source="user", payload=payload, delivery_id=delivery_id
                )
            ],
        )
    )


def events(cid: str, assignment: int, *batch: tuple[int, str, dict[str, Any]]) -> Any:
    return wpb.AttachRequest(
        events=wpb.LoopEvents(
            conversation_id=cid,
            assignment=assignment,
            events=[
                wpb.WorkerEvent(id=i, source=source, payload=dict_to_struct(payload))
                for i, source, payload in batch
            ],
        )
    )


async def assigned_worker(
    app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
    cid: str = "c1",
    pings: bool = True,
) -> tuple[ScriptedWorker, wpb.AssignLoop]:
    worker = scripted(pings=pings)
    worker.hello("bad")
    await worker.receive("welcome")
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id=cid, agent="worker-echo")
    )
    assign = await worker.receive("assign")
    history = await worker.receive("history")
    assert [e.id for e in history.events] == list(range(assign.next_event_id))
    return worker, assign


async def stored(stub: pb_grpc.ConversationServiceStub, cid: str) -> list[dict[str, Any]]:
    page = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id=cid, page_size=1000))
    return [struct_to_dict(e.payload) for e in page.events]


async def test_numbered_events_are_appended_and_a_send_gets_the_worker_s_id(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    first = assign.next_event_id
    worker.send(events("c1", assign.assignment, (first, "environment", STATE)))
    sending = stub.SendEvent(
        pb.SendEventRequest(
            conversation_id="c1",
            event=dict_to_struct({"action": "message", "args": {"content": "hi"}}),
        ),
        timeout=10,
    )
    deliver = await worker.receive("deliver")
    assert deliver.payload["action"] == "message"
    worker.send(logged("c1", assign.assignment, first + 1, deliver.payload, deliver.delivery_id))
    assert (await sending).event_id == first + 1
    log = await stored(stub, "c1")
    assert [e["id"] for e in log] == list(range(first + 2))
    assert not log_violations(log)


@pytest.mark.parametrize(
    ("shift", "reason"),
    [(1, "EVENT_ID_OUT_OF_SEQUENCE"), (-1, "EVENT_ID_OUT_OF_SEQUENCE")],
    ids=["skip", "repeat"],
)
async def test_ids_that_skip_or_repeat_detach_the_worker(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
    shift: int,
    reason: str,
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    before = await stored(stub, "c1")
    bad = assign.next_event_id + shift
    worker.send(events("c1", assign.assignment, (bad, "agent", {"action": "think"})))
    error = await worker.ended_with()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == reason
    assert f"next id is {assign.next_event_id}" in (error.details() or "")
    assert await stored(stub, "c1") == before
    # The conversation waits for another worker; its log is unchanged.
    assert worker_app.workers.holder("c1") is None


@pytest.mark.parametrize(
    "payload",
    [{"content": "neither action nor observation"}, {"action": ""}, {"action": 3}],
    ids=["no-kind", "empty-action", "number-action"],
)
async def test_malformed_events_detach_the_worker_and_stay_out_of_the_log(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
    payload: dict[str, Any],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    before = await stored(stub, "c1")
    first = assign.next_event_id
    # A good event and a bad one in one batch: the batch is checked before any is appended.
    worker.send(
        events(
            "c1", assign.assignment, (first, "environment", STATE), (first + 1, "agent", payload)
        )
    )
    error = await worker.ended_with()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "MALFORMED_WORKER_EVENT"
    assert await stored(stub, "c1") == before


async def test_an_unknown_source_is_malformed(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    worker.send(events("c1", assign.assignment, (assign.next_event_id, "root", STATE)))
    error = await worker.ended_with()
    assert error_info(error).reason == "MALFORMED_WORKER_EVENT"


async def test_events_for_a_conversation_not_assigned_detach_the_worker(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="other"))
    # The built-in echo agent's start is logged before the worker's attempt.
    await grpc_events_until(stub, "other", agent_state_is("awaiting_user_input"))
    before = await stored(stub, "other")
    worker.send(events("other", assign.assignment, (len(before), "agent", {"action": "think"})))
    error = await worker.ended_with()
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "WORKER_NOT_ASSIGNED"
    assert await stored(stub, "other") == before


async def test_an_unknown_delivery_id_detaches_the_worker(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    worker.send(
        logged(
            "c1",
            assign.assignment,
            assign.next_event_id,
            dict_to_struct({"action": "message"}),
            "made-up",
        )
    )
    error = await worker.ended_with()
    assert error_info(error).reason == "WORKER_PROTOCOL_VIOLATION"


async def test_a_delivery_logged_twice_in_one_batch_detaches_the_worker_and_appends_nothing(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    first = assign.next_event_id
    sending = stub.SendEvent(
        pb.SendEventRequest(
            conversation_id="c1",
            event=dict_to_struct({"action": "message", "args": {"content": "once"}}),
        ),
        timeout=10,
    )
    deliver = await worker.receive("deliver")
    twice = [
        wpb.WorkerEvent(
            id=first + n, source="user", payload=deliver.payload, delivery_id=deliver.delivery_id
        )
        for n in range(2)
    ]
    worker.send(
        wpb.AttachRequest(
            events=wpb.LoopEvents(conversation_id="c1", assignment=assign.assignment, events=twice)
        )
    )
    error = await worker.ended_with()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "WORKER_PROTOCOL_VIOLATION"
    assert [e["id"] for e in await stored(stub, "c1")] == list(range(first))  # neither event
    sending.cancel()


async def test_a_silent_worker_is_detached_and_its_conversation_reassigned(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, _ = await assigned_worker(worker_app, stub, scripted, pings=False)
    error = await worker.ended_with(timeout=10)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_info(error).reason == "WORKER_SILENT"
    healthy = scripted()
    healthy.hello("healthy")
    await healthy.receive("welcome")
    again = await healthy.receive("assign")
    assert again.conversation_id == "c1"


@pytest.mark.parametrize(
    ("first", "code", "reason"),
    [
        (wpb.AttachRequest(ping=wpb.WorkerPing()), "INVALID_ARGUMENT", "WORKER_PROTOCOL_VIOLATION"),
        (
            wpb.AttachRequest(
                hello=wpb.WorkerHello(worker_id="w", agent_kinds=["echo"], capacity=1)
            ),
            "INVALID_ARGUMENT",
            "AGENT_KIND_RESERVED",
        ),
        (
            wpb.AttachRequest(hello=wpb.WorkerHello(worker_id="w", agent_kinds=["k"], capacity=0)),
            "INVALID_ARGUMENT",
            "WORKER_PROTOCOL_VIOLATION",
        ),
        (
            wpb.AttachRequest(
                hello=wpb.WorkerHello(worker_id="w w", agent_kinds=["k"], capacity=1)
            ),
            "INVALID_ARGUMENT",
            "INVALID_ID",
        ),
    ],
    ids=["no-hello", "reserved-kind", "no-capacity", "bad-id"],
)
async def test_bad_hellos_are_refused(
    scripted: Callable[..., ScriptedWorker], first: Any, code: str, reason: str
) -> None:
    worker = scripted()
    worker.open(first)
    error = await worker.ended_with()
    assert error.code().name == code
    assert error_info(error).reason == reason


async def test_a_second_worker_with_the_same_id_is_refused(
    worker_app: ConvsvcApp, scripted: Callable[..., ScriptedWorker]
) -> None:
    first = scripted()
    first.hello("twin")
    await first.receive("welcome")
    second = scripted()
    second.hello("twin")
    error = await second.ended_with()
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert error_info(error).reason == "WORKER_ID_TAKEN"


async def test_attach_needs_the_service_token(tmp_path: Path) -> None:
    async with running_app(
        tmp_path / "data", auth_token="s3cret", workers=WorkersConfig(kinds=("worker-echo",))
    ) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            anonymous = ScriptedWorker(channel)
            anonymous.hello("w")
            error = await anonymous.ended_with()
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            trusted = ScriptedWorker(channel, (("authorization", "Bearer s3cret"),))
            trusted.hello("w")
            await trusted.receive("welcome")
            await attached(app, "w")
            trusted.close()


async def test_events_sent_while_the_conversation_closes_are_dropped_not_punished(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    first = assign.next_event_id
    worker.send(events("c1", assign.assignment, (first, "environment", STATE)))
    closing = asyncio.ensure_future(
        stub.CloseConversation(pb.CloseConversationRequest(conversation_id="c1"))
    )
    await worker.receive("stop")
    # The worker had not seen the stop: its next events are late, each continuing its own count.
    worker.send(events("c1", assign.assignment, (first + 1, "agent", {"action": "think"})))
    worker.send(events("c1", assign.assignment, (first + 2, "agent", {"action": "think"})))
    worker.send(
        wpb.AttachRequest(
            released=wpb.LoopReleased(conversation_id="c1", assignment=assign.assignment)
        )
    )
    await closing
    log = await stored(stub, "c1")
    assert [e["id"] for e in log] == list(range(len(log)))
    assert not [e for e in log if e.get("action") == "think"]
    assert log[-1]["extras"]["agent_state"] == "stopped"
    # Still attached: it takes the next conversation.
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c2", agent="worker-echo")
    )
    assert (await worker.receive("assign")).conversation_id == "c2"


async def test_a_retried_send_joins_the_delivery_its_first_attempt_left_on_the_way(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    request = pb.SendEventRequest(
        conversation_id="c1",
        event=dict_to_struct({"action": "message", "args": {"content": "once"}}),
        request_id="send-once",
    )
    first = stub.SendEvent(request, timeout=10)
    deliver = await worker.receive("deliver")
    first.cancel()  # the caller gives up after the worker got the event
    with pytest.raises(asyncio.CancelledError):
        await first
    # The retry races the worker's answer: it joins the delivery on its way, or (if the
    # event is durable first) reads the stored answer. Never does it deliver a second time.
    retry = asyncio.ensure_future(stub.SendEvent(request, timeout=10))
    worker.send(
        logged("c1", assign.assignment, assign.next_event_id, deliver.payload, deliver.delivery_id)
    )
    assert (await retry).event_id == assign.next_event_id
    # No second delivery reached the worker, and the log holds the message once.
    log = await stored(stub, "c1")
    assert [e.get("args", {}).get("content") for e in log].count("once") == 1
    again = await stub.SendEvent(request, timeout=10)
    assert again.event_id == assign.next_event_id
    later = asyncio.ensure_future(
        stub.SendEvent(
            pb.SendEventRequest(
                conversation_id="c1",
                event=dict_to_struct({"action": "message", "args": {"content": "next"}}),
            ),
            timeout=10,
        )
    )
    # Deliveries keep their order on the stream: the next one is the new message.
    assert (await worker.receive("deliver")).payload["args"]["content"] == "next"
    later.cancel()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05abc"], ids=["bad-tag", "truncated"])
async def test_bytes_that_do_not_parse_get_malformed_request(
    worker_app: ConvsvcApp, garbage: bytes
) -> None:
    assert worker_app.server is not None
    async with grpc.aio.insecure_channel(worker_app.server.address) as channel:
        attach = channel.stream_stream(
            "/convsvc.v1.AgentWorkerService/Attach",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )

        async def requests() -> Any:
            yield garbage

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in attach(requests()):
                pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "MALFORMED_REQUEST"


async def test_a_worker_that_announces_too_many_kinds_is_refused(
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker = scripted()
    worker.hello("greedy", tuple(f"kind-{n}" for n in range(33)))
    error = await worker.ended_with()
    assert error_info(error).reason == "WORKER_PROTOCOL_VIOLATION"
    assert "at most 32" in (error.details() or "")


async def test_a_worker_that_reads_nothing_is_detached_once_its_backlog_is_full() -> None:
    # gRPC's flow control holds megabytes before our backlog grows: this checks the pool's
    # rule directly, with a backlog of 16.
    pool = WorkerPool(
        WorkersConfig(kinds=("worker-echo",), max_unread_messages=16), (), max_event_bytes=1024
    )
    session = pool.attach("deaf", ["worker-echo"], 1)
    stop = StopMessage("c1", 1)
    for _ in range(16):
        session.send(stop)
    assert not session.detached
    session.send(stop)
    assert session.detached
    queued = [session.outbox.get_nowait() for _ in range(session.outbox.qsize())]
    error = queued[-1]
    assert isinstance(error, ResourceExhausted)
    assert error.reason == "WORKER_TOO_SLOW"
    assert list(pool.workers()) == []


async def test_a_worker_s_backlog_is_bounded_in_bytes_too() -> None:
    pool = WorkerPool(
        WorkersConfig(kinds=("worker-echo",), max_unread_bytes=1024 * 1024),
        (),
        max_event_bytes=1024,
    )
    session = pool.attach("deaf", ["worker-echo"], 1)
    big = DeliverMessage("c1", 1, "d", {"action": "message"}, payload_bytes=300_000)
    for _ in range(3):
        session.send(big)
    assert not session.detached
    session.send(big)  # a fourth would pass the budget: few messages, many bytes
    assert session.detached
    queued = [session.outbox.get_nowait() for _ in range(session.outbox.qsize())]
    assert isinstance(queued[-1], ResourceExhausted)
    assert queued[-1].reason == "WORKER_TOO_SLOW"


async def test_status_updates_count_at_their_real_size_against_a_stream_s_buffer(
    tmp_path: Path,
) -> None:
    engine = EngineConfig(subscriber_buffer_bytes=4 * 1024 * 1024)
    async with running_app(tmp_path / "data", workers=FAST_LIVENESS, engine=engine) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            worker = ScriptedWorker(channel)
            worker.hello("w")
            await worker.receive("welcome")
            await stub.StartConversation(
                pb.StartConversationRequest(conversation_id="c1", agent="worker-echo")
            )
            assign = await worker.receive("assign")
            stream = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="c1"))
            await stream.read()  # subscribed; from here it reads nothing
            reader = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="c1"))
            await reader.read()  # this one reads everything, as it comes
            big = dict_to_struct({"status_update": True, "type": "info", "message": "x" * 900_000})
            for _ in range(40):  # 36 MB of statuses towards a stream allowed 4 MiB
                worker.send(
                    wpb.AttachRequest(
                        status=wpb.LoopStatus(
                            conversation_id="c1", assignment=assign.assignment, status=big
                        )
                    )
                )
            async with asyncio.timeout(30):
                for _ in range(40):
                    while not (await reader.read()).HasField("status_update"):
                        pass
            # Every status has been published: the stream that did not read was dropped.
            await expect_error(
                _read_to_the_end(stream), grpc.StatusCode.RESOURCE_EXHAUSTED, "SUBSCRIBER_TOO_SLOW"
            )
            # A status larger than an event may be is the worker's protocol error.
            huge = dict_to_struct({"status_update": True, "message": "x" * 1_100_000})
            worker.send(
                wpb.AttachRequest(
                    status=wpb.LoopStatus(
                        conversation_id="c1", assignment=assign.assignment, status=huge
                    )
                )
            )
            error = await worker.ended_with()
            assert error_info(error).reason == "PAYLOAD_TOO_LARGE"
            worker.close()


async def _read_to_the_end(stream: Any) -> None:
    async with asyncio.timeout(30):
        while await stream.read() is not grpc.aio.EOF:
            pass


async def test_a_worker_that_reads_nothing_is_detached_over_grpc(tmp_path: Path) -> None:
    config = WorkersConfig(kinds=("worker-echo",), max_unread_messages=16)
    async with running_app(tmp_path / "data", workers=config) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            # No pings: a write racing the server's end of the stream fails on the client,
            # which then reports its own INTERNAL instead of the status the server sent.
            worker = ScriptedWorker(channel, pings=False)
            worker.hello("deaf")
            await worker.receive("welcome")
            await stub.StartConversation(
                pb.StartConversationRequest(conversation_id="c1", agent="worker-echo")
            )
            # From here on the worker reads nothing: large deliveries fill the transport's
            # window, then convsvc's backlog for it.
            big = {"action": "message", "args": {"content": "x" * 200_000}}
            sends = [
                asyncio.ensure_future(
                    stub.SendEvent(
                        pb.SendEventRequest(conversation_id="c1", event=dict_to_struct(big)),
                        timeout=30,
                    )
                )
                for _ in range(60)
            ]
            await app.workers.wait_until(lambda: not list(app.workers.workers()), 30)
            # Reading now drains what the transport held, then the status it ended with.
            error = await worker.ended_with(timeout=30)
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(error).reason == "WORKER_TOO_SLOW"
            for send in sends:
                send.cancel()
            await asyncio.gather(*sends, return_exceptions=True)
            worker.close()


def ask_completion(stub: pb_grpc.ConversationServiceStub) -> asyncio.Future[Any]:
    """A CompleteWithAgentLlm call on c1, left running while the worker is scripted."""
    return asyncio.ensure_future(
        stub.CompleteWithAgentLlm(
            pb.CompleteWithAgentLlmRequest(
                conversation_id="c1", messages=[dict_to_struct({"role": "user", "content": "x"})]
            ),
            timeout=10,
        )
    )


async def test_a_completion_error_from_the_worker_is_a_clear_status(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    asking = ask_completion(stub)
    request = await worker.receive("completion")
    worker.send(
        wpb.AttachRequest(
            completion=wpb.CompletionResult(
                conversation_id="c1",
                assignment=assign.assignment,
                request_id=request.request_id,
                error="AuthenticationError: bad key",
            )
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asking
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "LLM_FAILED"
    assert "AuthenticationError" in (caught.value.details() or "")


async def test_a_completion_in_flight_when_the_worker_dies_answers_unavailable(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, _ = await assigned_worker(worker_app, stub, scripted)
    asking = ask_completion(stub)
    await worker.receive("completion")
    worker.close()  # the worker goes away without answering
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asking
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "WORKER_LOST"


async def test_an_event_beyond_the_size_limit_detaches_the_worker_and_stays_out(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    before = await stored(stub, "c1")
    huge = {"action": "message", "args": {"content": "x" * (3 * 1024 * 1024 + 1)}}
    worker.send(events("c1", assign.assignment, (assign.next_event_id, "agent", huge)))
    error = await worker.ended_with()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "PAYLOAD_TOO_LARGE"
    assert await stored(stub, "c1") == before


async def test_kinds_leave_with_their_last_worker_and_unknown_agents_get_a_bounded_answer(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    many = tuple(f"kind-{n:02}" for n in range(32))
    for cycle in range(3):  # kinds announced and gone, again and again
        worker = scripted()
        worker.hello(f"passing-{cycle}", tuple(f"{kind}-{cycle}" for kind in many))
        await worker.receive("welcome")
        worker.close()
        await worker_app.workers.wait_until(lambda: not list(worker_app.workers.workers()), 10)
    details = await expect_error(
        stub.StartConversation(
            pb.StartConversationRequest(conversation_id="c1", agent="kind-00-0")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_AGENT",
    )
    assert "kind-01-2" not in details  # forgotten
    assert "worker-echo" in details  # configured kinds stay

    worker = scripted()
    worker.hello("wide", many)
    await worker.receive("welcome")
    details = await expect_error(
        stub.StartConversation(pb.StartConversationRequest(conversation_id="c1", agent="x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_AGENT",
    )
    assert len(details) < 1000 and "more" in details  # named in part, not all of them
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c2", agent="kind-31"))
    worker.close()


async def test_a_stopped_conversation_joined_again_runs_its_own_agent(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    worker, _ = await assigned_worker(worker_app, stub, scripted)
    await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="c1"))
    await worker.receive("stop")
    joined = await stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="c1", connection_id="tab")
    )
    assert joined.conversation.agent == "worker-echo"  # not the server's default agent
    again = await worker.receive("assign")
    assert again.conversation_id == "c1" and again.agent_kind == "worker-echo"


@pytest.mark.parametrize("megabytes", [0.7, 1.6, 3.2])
async def test_a_send_too_large_for_the_log_is_refused_where_it_enters_a_worker_conversation(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
    megabytes: float,
) -> None:
    worker, assign = await assigned_worker(worker_app, stub, scripted)
    text = "x" * int(megabytes * 1024 * 1024)  # stored twice: as message and as content
    await expect_error(
        stub.SendEvent(
            pb.SendEventRequest(
                conversation_id="c1",
                event=dict_to_struct({"action": "message", "args": {"content": text}}),
            ),
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYLOAD_TOO_LARGE",
    )
    # Nothing of it reached the worker, which stays attached: the next delivery is this one.
    sending = stub.SendEvent(
        pb.SendEventRequest(
            conversation_id="c1",
            event=dict_to_struct({"action": "message", "args": {"content": "small"}}),
        ),
        timeout=10,
    )
    deliver = await worker.receive("deliver")
    assert struct_to_dict(deliver.payload)["args"]["content"] == "small"
    worker.send(
        logged("c1", assign.assignment, assign.next_event_id, deliver.payload, deliver.delivery_id)
    )
    await sending
    assert [w.worker_id for w in worker_app.workers.workers()] == ["bad"]


async def test_a_start_whose_first_events_do_not_fit_in_one_message_is_refused(
    stub: pb_grpc.ConversationServiceStub,
) -> None:
    replay = [
        dict_to_struct({"source": "user", "action": "message", "args": {"content": "y" * 300_000}})
        for _ in range(8)
    ]  # each alone is within limits; together they are too much for one message
    await expect_error(
        stub.StartConversation(
            pb.StartConversationRequest(
                conversation_id="c1", agent="worker-echo", replay_events=replay
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYLOAD_TOO_LARGE",
    )
    await expect_error(
        stub.GetConversation(pb.GetConversationRequest(conversation_id="c1")),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )


async def test_a_fork_reaches_its_worker_as_a_takeover_with_stored_settings_and_new_secrets(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    scripted: Callable[..., ScriptedWorker],
) -> None:
    """The fork's loop gets the copied log as its history (as a loop taken over gets its
    log) and the source's stored settings under the secrets the caller sent again."""
    worker = scripted()
    worker.hello("bad")
    await worker.receive("welcome")
    await stub.StartConversation(
        pb.StartConversationRequest(
            conversation_id="src",
            agent="worker-echo",
            settings=dict_to_struct({"llm_model": "m", "llm_api_key": "sk-secret-1"}),
        )
    )
    assign = await worker.receive("assign")
    await worker.receive("history")
    first = assign.next_event_id
    worker.send(events("src", assign.assignment, (first, "environment", STATE)))
    await grpc_events_until(stub, "src", lambda ps: len(ps) == first + 1)

    await stub.ForkConversation(
        pb.ForkConversationRequest(
            source_conversation_id="src",
            conversation_id="fork",
            settings=dict_to_struct({"llm_api_key": "sk-secret-2"}),
        )
    )
    forked = await worker.receive("assign")
    settings = struct_to_dict(forked.settings)
    assert (settings["llm_model"], settings["llm_api_key"]) == ("m", "sk-secret-2")
    history = await worker.receive("history")
    assert [e.id for e in history.events] == list(range(forked.next_event_id))
    copied = [struct_to_dict(e.payload) for e in history.events]
    assert copied[: first + 1] == await stored(stub, "src")  # then the fork's "loading"
