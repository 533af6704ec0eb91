"""Real ``convworker`` processes running ``worker-echo``: end to end, worker death, the death
of one conversation's process, and close."""

from __future__ import annotations

import asyncio
import os
import select
import signal
from collections.abc import Callable
from typing import Any

import grpc

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import (
    agent_state_is,
    echo_of,
    expect_error,
    grpc_events_until,
    ids,
    log_violations,
)
from tests.workers.conftest import WorkerProcess, attached, children_of


def message(text: str) -> pb.SendEventRequest:
    return dict_to_struct({"action": "message", "args": {"content": text}})


async def start(stub: pb_grpc.ConversationServiceStub, cid: str, first: str) -> None:
    await stub.StartConversation(
        pb.StartConversationRequest(
            conversation_id=cid, agent="worker-echo", initial_user_message=message(first)
        )
    )


async def send(stub: pb_grpc.ConversationServiceStub, cid: str, text: str) -> int:
    response = await stub.SendEvent(
        pb.SendEventRequest(conversation_id=cid, event=message(text)), timeout=30
    )
    return int(response.event_id)


async def worker_running_c1(
    app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
    first: str,
) -> WorkerProcess:
    """Worker w1 attached and running conversation c1, which has echoed ``first``."""
    assert app.server is not None
    worker = start_worker(app.server.address, "w1")
    await attached(app, "w1")
    await start(stub, "c1", first)
    await grpc_events_until(stub, "c1", echo_of(first), timeout=30)
    return worker


async def test_a_worker_runs_a_conversation_end_to_end(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    await worker_running_c1(worker_app, stub, start_worker, "first")
    event_id = await send(stub, "c1", "second")
    echoed = echo_of("second")
    waiting = agent_state_is("awaiting_user_input")
    payloads = await grpc_events_until(
        stub, "c1", lambda seen: echoed(seen) and waiting(seen), timeout=30
    )
    assert not log_violations(payloads)
    assert ids(payloads) == list(range(len(ids(payloads))))
    sent = [p for p in payloads if p.get("source") == "user"]
    assert [p["args"]["content"] for p in sent] == ["first", "second"]
    assert sent[1]["id"] == event_id  # the send answered with the id the worker gave it
    view = (
        await stub.GetConversation(pb.GetConversationRequest(conversation_id="c1"))
    ).conversation
    assert view.agent == "worker-echo"
    assert view.agent_state == "awaiting_user_input"


async def test_a_killed_worker_s_conversation_continues_on_another(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    first = await worker_running_c1(worker_app, stub, start_worker, "before")
    assert worker_app.workers.holder("c1") == "w1"
    start_worker(worker_app.server.address, "w2")
    await attached(worker_app, "w2")

    first.kill()
    await worker_app.workers.wait_until(lambda: worker_app.workers.holder("c1") == "w2", 30)
    await send(stub, "c1", "after")
    payloads = await grpc_events_until(stub, "c1", echo_of("after"), timeout=30)
    assert not log_violations(payloads)
    assert ids(payloads) == list(range(len(ids(payloads))))
    contents = [p["args"]["content"] for p in payloads if p.get("source") == "user"]
    assert contents == ["before", "after"]  # nothing lost, nothing repeated


async def test_a_killed_conversation_process_is_started_again(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    worker = await worker_running_c1(worker_app, stub, start_worker, "one")
    [pid] = worker.conversation_pids()
    held = worker_app.workers.assignment_of("c1")
    assert held is not None
    _, assignment = held

    os.kill(pid, signal.SIGKILL)
    await worker_app.workers.wait_until(
        lambda: (
            (held := worker_app.workers.assignment_of("c1")) is not None
            and held[0] == "w1"
            and held[1] > assignment
        ),
        30,
    )
    await send(stub, "c1", "two")
    payloads = await grpc_events_until(stub, "c1", echo_of("two"), timeout=30)
    assert not log_violations(payloads)
    assert [p["args"]["content"] for p in payloads if p.get("source") == "user"] == ["one", "two"]
    assert pid not in worker.conversation_pids()


async def test_a_send_waits_for_a_worker_to_attach(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", agent="worker-echo")
    )
    sending = stub.SendEvent(
        pb.SendEventRequest(conversation_id="c1", event=message("early")), timeout=60
    )
    start_worker(worker_app.server.address, "late")
    event_id = (await sending).event_id
    payloads = await grpc_events_until(stub, "c1", echo_of("early"), timeout=30)
    assert [p["id"] for p in payloads if p.get("source") == "user"] == [event_id]
    assert not log_violations(payloads)


async def test_close_stops_the_loop_on_its_worker_before_logging_stopped(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    worker = await worker_running_c1(worker_app, stub, start_worker, "hello")
    await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="c1"))
    page = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id="c1", page_size=100))
    last = page.events[-1]
    assert last.name == "agent_state_changed"
    assert last.payload["extras"]["agent_state"] == "stopped"
    assert worker_app.workers.holder("c1") is None
    await worker_app.workers.wait_until(lambda: not worker.conversation_pids(), 10)
    # Started again, it continues on a worker with its history.
    await start(stub, "c1", "again")
    payloads = await grpc_events_until(stub, "c1", echo_of("again"), timeout=30)
    assert not log_violations(payloads)


async def test_a_kind_without_workers_is_startable_and_unknown_kinds_are_refused(
    stub: pb_grpc.ConversationServiceStub,
) -> None:
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", agent="worker-echo")
    )
    details = await expect_error(
        stub.StartConversation(
            pb.StartConversationRequest(conversation_id="c2", agent="no-such-kind")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_AGENT",
    )
    assert "worker-echo" in details


async def test_a_start_beyond_every_worker_s_capacity_waits_and_says_so(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    start_worker(worker_app.server.address, "small", CONVSVC_WORKER_CAPACITY="1")
    await attached(worker_app, "small")
    await start(stub, "first", "one")
    await grpc_events_until(stub, "first", echo_of("one"), timeout=30)
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id="second", agent="worker-echo")
    )
    # A stream opened after the start still learns why nothing happens (repeated status).
    await grpc_events_until(
        stub,
        "second",
        lambda payloads: any(
            p.get("status_update_item", {}).get("id") == "STATUS$WAITING_FOR_AGENT_WORKER"
            for p in payloads
        ),
        timeout=30,
    )
    assert worker_app.workers.holder("second") is None
    await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="first"))
    await worker_app.workers.wait_until(lambda: worker_app.workers.holder("second") == "small", 30)


async def test_a_completion_is_answered_by_the_conversation_s_worker(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    start_worker(worker_app.server.address, "w1")
    await attached(worker_app, "w1")
    await start(stub, "c1", "hello")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ping"}]
    answer = await stub.CompleteWithAgentLlm(
        pb.CompleteWithAgentLlmRequest(
            conversation_id="c1",
            service_id="remember_prompt",
            llm_config=dict_to_struct({"model": "openai/x", "api_key": "sk-secret"}),
            messages=[dict_to_struct(m) for m in messages],
        ),
        timeout=30,
    )
    assert answer.content == "ping"  # worker-echo answers with the last message
    # Nothing was logged for it.
    payloads = await grpc_events_until(stub, "c1", echo_of("hello"), timeout=30)
    assert not [p for p in payloads if p.get("args", {}).get("content") == "ping"]


async def test_the_built_in_echo_agent_has_no_llm_to_answer(
    stub: pb_grpc.ConversationServiceStub,
) -> None:
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
    await expect_error(
        stub.CompleteWithAgentLlm(
            pb.CompleteWithAgentLlmRequest(
                conversation_id="c1", messages=[dict_to_struct({"role": "user", "content": "x"})]
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "COMPLETION_NOT_SUPPORTED",
    )
    await expect_error(
        stub.CompleteWithAgentLlm(pb.CompleteWithAgentLlmRequest(conversation_id="c1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_acknowledged_sends_survive_repeated_worker_kills_once_each(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Four senders with request ids (retrying until acknowledged) while the worker that runs
    the conversation is killed three times: every send is logged exactly once, under the id
    it was acknowledged with, and the log has no gap."""
    assert worker_app.server is not None
    address = worker_app.server.address
    workers = {name: start_worker(address, name) for name in ("w0", "w1")}
    for name in workers:
        await attached(worker_app, name)
    await start(stub, "c1", "first")
    acknowledged: dict[str, int] = {}
    progress = asyncio.Event()

    async def sender(n: int) -> None:
        for i in range(10):
            content = f"s{n}-{i}"
            request = pb.SendEventRequest(
                conversation_id="c1", event=message(content), request_id=f"r{n}-{i}"
            )
            while True:  # the retry a client makes after a lost answer, same request id
                try:
                    acknowledged[content] = (await stub.SendEvent(request, timeout=15)).event_id
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise
            progress.set()

    async def killer() -> None:
        for kill in range(3):
            while len(acknowledged) < (kill + 1) * 8:
                progress.clear()
                await progress.wait()
            holder = worker_app.workers.holder("c1")
            assert holder is not None
            workers.pop(holder).kill()
            name = f"w{kill + 2}"
            workers[name] = start_worker(address, name)
            await attached(worker_app, name)

    await asyncio.wait_for(asyncio.gather(*(sender(n) for n in range(4)), killer()), 120)
    page = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id="c1", page_size=1000))
    log = [struct_to_dict(e.payload) for e in page.events]
    assert not log_violations(log)
    assert [e["id"] for e in log] == list(range(len(log)))
    sent = [e for e in log if e.get("source") == "user"]
    contents = [e["args"]["content"] for e in sent]
    assert sorted(contents) == sorted(["first", *acknowledged])  # each once
    by_content = {e["args"]["content"]: e["id"] for e in sent}
    assert all(by_content[c] == event_id for c, event_id in acknowledged.items())


async def test_a_worker_whose_zygote_dies_exits_and_its_conversations_move(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    broken = await worker_running_c1(worker_app, stub, start_worker, "before")
    start_worker(worker_app.server.address, "w2")
    await attached(worker_app, "w2")
    [zygote] = children_of(broken.process.pid)
    os.kill(zygote, signal.SIGKILL)
    # It can start no conversation any more: it exits with an error for its supervisor.
    code = await asyncio.wait_for(asyncio.to_thread(broken.process.wait), 30)
    assert code != 0
    assert "zygote process died" in broken.log()
    await worker_app.workers.wait_until(lambda: worker_app.workers.holder("c1") == "w2", 30)
    await send(stub, "c1", "after")
    await grpc_events_until(stub, "c1", echo_of("after"), timeout=30)


def exits_within(pid: int, timeout: float) -> bool:
    """Whether the process ends within ``timeout`` (waited on through a pidfd: its exit is
    an event, while the pid itself lingers until init reaps an orphan)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


async def test_a_worker_stopped_with_sigterm_hands_its_conversations_over(
    worker_app: ConvsvcApp,
    stub: pb_grpc.ConversationServiceStub,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    assert worker_app.server is not None
    leaving = await worker_running_c1(worker_app, stub, start_worker, "before")
    [conversation_pid] = leaving.conversation_pids()
    start_worker(worker_app.server.address, "w2")
    await attached(worker_app, "w2")
    leaving.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(asyncio.to_thread(leaving.process.wait), 30) == 0
    # Its conversation processes went with it.
    assert await asyncio.to_thread(exits_within, conversation_pid, 10)
    await worker_app.workers.wait_until(lambda: worker_app.workers.holder("c1") == "w2", 30)
    await send(stub, "c1", "after")
    payloads = await grpc_events_until(stub, "c1", echo_of("after"), timeout=30)
    assert not log_violations(payloads)
    assert [p["args"]["content"] for p in payloads if p.get("source") == "user"] == [
        "before",
        "after",
    ]


async def test_convsvc_stops_gracefully_with_workers_attached_and_logs_stopped(
    server_process: Callable[..., Any], start_worker: Callable[..., WorkerProcess]
) -> None:
    server = server_process({"CONVSVC_WORKERS__KINDS": '["worker-echo"]'})
    address = server.start()
    worker = start_worker(address, "w1")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await start(stub, "c1", "hello")
        await grpc_events_until(stub, "c1", echo_of("hello"), timeout=30)
    assert server.terminate(timeout=30) == 0  # SIGTERM while the loop runs on the worker
    assert worker.process.poll() is None  # the worker outlives it and will attach again
    restarted = server.start()
    async with grpc.aio.insecure_channel(restarted) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        page = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id="c1"))
    log = [struct_to_dict(e.payload) for e in page.events]
    assert [e["id"] for e in log] == list(range(len(log)))
    assert log[-1]["extras"]["agent_state"] == "stopped"
