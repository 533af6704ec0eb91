"""Property-based fuzzing of the worker protocol (AgentWorkerService.Attach) against a real
server process, like the public API's: a worker that sends anything at all.

Streams are generated from the protocol's own descriptors: a hello or not, then messages of
every kind about a conversation that waits for a worker of the fuzzed kind, with ids,
assignments, sources and payloads near and far from what is expected, and raw bytes.

Invariants: a stream the server ends carries a precise status (never UNKNOWN or INTERNAL) with
an ErrorInfo; the conversation's log stays gap-free and valid; the server keeps serving, and
its log holds no error record and no traceback.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convclient.structs import struct_to_dict
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import conversation_service_pb2 as pb
from tests.conftest import ServerProcess
from tests.helpers import error_info, log_violations
from tests.hostile.test_fuzz import FORBIDDEN, FUZZ_SETTINGS, message_of, serving, struct_of

ATTACH = "/convsvc.v1.AgentWorkerService/Attach"
KIND = "fuzz-kind"
CID = "fuzz-w"
EXAMPLES = 300
OPERATIONAL_ERRORS = {"worker.loop_gave_up"}

event_payloads = st.sampled_from(
    [
        {"observation": "agent_state_changed", "content": "", "extras": {"agent_state": "x"}},
        {"action": "message", "args": {"content": "hi"}},
        {"action": "", "observation": "both"},
        {},
        {"action": "x" * 300},
    ]
).map(struct_of)


@dataclass
class Planned:
    """A message to send once the worker knows its assignment: ids relative to the log's
    next one, the assignment right or not (``shift``)."""

    message: wpb.AttachRequest
    relative_ids: bool
    shift: int

    def filled(self, assignment: int, next_id: int) -> wpb.AttachRequest:
        message = wpb.AttachRequest()
        message.CopyFrom(self.message)
        kind = message.WhichOneof("message")
        if kind in ("events", "status", "failed", "released", "completion"):
            part = getattr(message, kind)
            if part.conversation_id == CID:
                part.assignment = assignment + self.shift
        if kind == "events" and self.relative_ids:
            for event in message.events.events:
                event.id += next_id
        return message


@st.composite
def near_events(draw: st.DrawFn) -> Planned:
    """Events about the assigned conversation: ids near its log's end, sources and delivery
    ids right or wrong, the assignment mostly right."""
    first = draw(st.integers(min_value=-2, max_value=3))
    events = [
        wpb.WorkerEvent(
            id=first + offset + draw(st.sampled_from([0, 0, 0, 1, -1])),
            source=draw(st.sampled_from(["environment", "agent", "user", "", "robot"])),
            payload=draw(event_payloads),
            delivery_id=draw(st.sampled_from(["", "", "made-up"])),
        )
        for offset in range(draw(st.integers(min_value=1, max_value=4)))
    ]
    message = wpb.AttachRequest(
        events=wpb.LoopEvents(
            conversation_id=draw(st.sampled_from([CID, CID, CID, "other"])), events=events
        )
    )
    return Planned(message, True, draw(st.sampled_from([0, 0, 0, 1, -1])))


statuses = st.builds(
    lambda status, shift: Planned(
        wpb.AttachRequest(status=wpb.LoopStatus(conversation_id=CID, status=status)), False, shift
    ),
    event_payloads,
    st.sampled_from([0, 0, 1]),
)
anything = message_of(wpb.AttachRequest.DESCRIPTOR).map(lambda m: Planned(m, False, 0))
streams = st.tuples(
    st.sampled_from(["good", "good", "good", "bad id!", ""]),
    st.sampled_from([[KIND], [KIND], [KIND], [], ["echo"]]),
    st.lists(st.one_of(near_events(), near_events(), statuses, anything), max_size=6),
)


@pytest.fixture(scope="module")
def worker_fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("worker-fuzz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
    env.update(
        {
            "CONVSVC_LOG_LEVEL": "INFO",
            "CONVSVC_WORKERS__KINDS": json.dumps([KIND]),
            "CONVSVC_WORKERS__PING_INTERVAL_SECONDS": "0.2",
            "CONVSVC_WORKERS__SILENCE_TIMEOUT_SECONDS": "1",
            # Broken workers one after another: the conversation keeps asking for the next.
            "CONVSVC_WORKERS__MAX_RESTARTS": "1000000",
        }
    )
    server = ServerProcess(base / "data", env)
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        channel.unary_unary(
            "/convsvc.v1.ConversationService/StartConversation",
            request_serializer=pb.StartConversationRequest.SerializeToString,
            response_deserializer=pb.StartConversationResponse.FromString,
        )(pb.StartConversationRequest(conversation_id=CID, agent=KIND))
    yield server
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)


@pytest.fixture(scope="module")
def worker_channel(worker_fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(worker_fuzz_server.address) as opened:
        yield opened


_workers = itertools.count()


def attach(channel: grpc.Channel, worker_id: str, kinds: list[str], plan: list[Planned]) -> str:
    """Plays one worker: its hello; once assigned (if it is), the planned messages filled in
    with its assignment; then reads until the stream ends. The status code name after
    checking the invariants."""
    if worker_id == "good":
        worker_id = f"fuzz-{next(_workers)}"
    outgoing: queue.SimpleQueue[wpb.AttachRequest | None] = queue.SimpleQueue()
    outgoing.put(
        wpb.AttachRequest(hello=wpb.WorkerHello(worker_id=worker_id, agent_kinds=kinds, capacity=1))
    )

    def requests() -> Iterator[wpb.AttachRequest]:
        while (message := outgoing.get()) is not None:
            yield message

    failure: grpc.RpcError | None = None
    call = channel.stream_stream(
        ATTACH,
        request_serializer=wpb.AttachRequest.SerializeToString,
        response_deserializer=wpb.AttachResponse.FromString,
    )(requests(), timeout=1.0)
    try:
        for response in call:
            if response.WhichOneof("message") == "assign":
                assign = response.assign
                for planned in plan:
                    outgoing.put(planned.filled(assign.assignment, assign.next_event_id))
    except grpc.RpcError as exc:
        failure = exc
    finally:
        outgoing.put(None)
    if failure is None:
        return "OK"
    code = failure.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "OK"  # an acceptable worker stays attached: our deadline ended it
    assert code.name not in FORBIDDEN, (code, failure.details())  # type: ignore[attr-defined]
    assert "Traceback" not in (failure.details() or "")  # type: ignore[attr-defined]
    assert error_info(failure).reason  # type: ignore[arg-type]
    return str(code.name)


def attach_raw(channel: grpc.Channel, requests: list[bytes]) -> str:
    failure: grpc.RpcError | None = None
    try:
        for _ in channel.stream_stream(ATTACH)(iter(requests), timeout=0.5):
            pass
    except grpc.RpcError as exc:
        failure = exc
    if failure is None:
        return "OK"
    code = failure.code()  # type: ignore[attr-defined]
    assert code.name not in FORBIDDEN, (code, failure.details())  # type: ignore[attr-defined]
    assert error_info(failure).reason  # type: ignore[arg-type]
    return str(code.name)


@settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
@given(streams)
def test_any_worker_stream_gets_a_precise_answer(
    worker_channel: grpc.Channel, tally, stream: tuple[str, list[str], list[Planned]]
) -> None:
    tally.call("fuzz (worker protocol)", attach(worker_channel, *stream))


@FUZZ_SETTINGS
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_raw_bytes_from_a_worker_get_a_precise_answer(
    worker_channel: grpc.Channel, tally, data: list[bytes]
) -> None:
    tally.call("fuzz (worker protocol, raw bytes)", attach_raw(worker_channel, data))


def test_the_log_stayed_valid_and_the_server_clean(
    worker_channel: grpc.Channel, worker_fuzz_server: ServerProcess, tally
) -> None:
    assert serving(worker_channel)
    search = worker_channel.unary_unary(
        "/convsvc.v1.ConversationService/SearchEvents",
        request_serializer=pb.SearchEventsRequest.SerializeToString,
        response_deserializer=pb.SearchEventsResponse.FromString,
    )
    page = search(pb.SearchEventsRequest(conversation_id=CID, page_size=1000))
    payloads = [struct_to_dict(event.payload) for event in page.events]
    assert payloads and not log_violations(payloads), log_violations(payloads)
    for line in worker_fuzz_server.logs().splitlines():
        record = json.loads(line)
        assert "Traceback" not in line and "exception" not in record, line
        if record.get("level") in ("error", "critical"):
            # Errors of the conversation, not of the server: it could not run on a worker.
            assert record["event"] in OPERATIONAL_ERRORS, line
    tally.checked("worker fuzz: logs gap-free and valid, server clean")
