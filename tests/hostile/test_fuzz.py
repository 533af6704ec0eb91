"""Property-based fuzzing of every ConversationService RPC against a real server process.

Requests are generated from the service's own descriptors, so a new RPC or field is fuzzed
without touching this file: strings mix ids that exist, valid ids, odd text and huge values;
numbers hit their boundaries; Structs are arbitrary JSON. Raw bytes are sent too.

Invariants, for every call: the answer is never UNKNOWN or INTERNAL; an error carries an
ErrorInfo with a reason; the server keeps serving (health); and afterwards its log holds one
JSON object per line and no traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convsvc.v1 import conversation_service_pb2 as pb
from tests.conftest import ServerProcess
from tests.helpers import error_info

SERVICE = pb.DESCRIPTOR.services_by_name["ConversationService"]
METHODS = [method.name for method in SERVICE.methods]
KNOWN = ["fuzz-a", "fuzz-b", "conn-a", "conn-b", "fuzz-user", "other-user", "web-1", "req-1"]
FORBIDDEN = {"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNIMPLEMENTED"}
EXAMPLES = 200  # per RPC, structured; the raw-bytes property runs as many in all

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.text(max_size=50),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {"action": st.sampled_from(["message", "note", "", "x" * 200])},
    optional={
        "args": st.dictionaries(st.text(max_size=10), json_value, max_size=3),
        "source": st.sampled_from(["user", "agent"]),
        "id": st.integers(),
    },
)
strings = st.one_of(
    st.sampled_from(KNOWN),  # twice: most calls should reach past validation
    st.sampled_from(KNOWN),
    st.sampled_from(KNOWN),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True),
    st.text(max_size=40),
    st.sampled_from(["", " ", "x" * 129, "y" * 10_000, "../../etc", "a\x00b"]),
)
numbers = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


def struct_of(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


@st.composite
def message_of(draw: st.DrawFn, message: descriptor.Descriptor) -> Message:
    """A message with each field set or left out at random."""
    cls = message_factory.GetMessageClass(message)
    fields: dict[str, Any] = {}
    for field in message.fields:
        if not draw(st.booleans()):
            continue
        fields[field.name] = draw(value_of(field))
    for oneof in message.oneofs:  # keep at most one member of a oneof, as protobuf requires
        present = [f.name for f in oneof.fields if f.name in fields]
        for extra in present[1:]:
            del fields[extra]
    return cls(**fields)


def value_of(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        # labels: keys valid or not, values short or over the limit
        return st.dictionaries(strings, strings, max_size=6)
    if field.message_type is not None and field.message_type.full_name == "google.protobuf.Struct":
        one = st.one_of(event_like, st.dictionaries(st.text(max_size=10), json_value, max_size=4))
        one = one.map(struct_of)
    elif field.message_type is not None and field.message_type.full_name == (
        "google.protobuf.Timestamp"
    ):
        # Any seconds and nanos, the invalid ones included (negative nanos, year 10000+).
        one = st.builds(
            timestamp_pb2.Timestamp,
            seconds=numbers,
            nanos=numbers.filter(lambda n: -(2**31) <= n < 2**31),
        )
    elif field.message_type is not None:
        one = message_of(field.message_type)  # e.g. Connect's open and send
    elif field.type == descriptor.FieldDescriptor.TYPE_STRING:
        one = strings
    elif field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        one = st.booleans()
    elif field.type in (
        descriptor.FieldDescriptor.TYPE_INT32,
        descriptor.FieldDescriptor.TYPE_ENUM,
    ):
        one = st.integers(min_value=-(2**31), max_value=2**31 - 1)
    elif field.type == descriptor.FieldDescriptor.TYPE_INT64:
        one = numbers
    else:
        raise AssertionError(f"no strategy for {field.full_name}: extend the fuzzer")
    if field.is_repeated:
        return st.lists(one, max_size=5)
    return one


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    import os

    base = tmp_path_factory.mktemp("fuzz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
    env["CONVSVC_LOG_LEVEL"] = "INFO"
    server = ServerProcess(base / "data", env)
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/convsvc.v1.ConversationService/JoinConversation",
            request_serializer=pb.JoinConversationRequest.SerializeToString,
            response_deserializer=pb.JoinConversationResponse.FromString,
        )
        for cid, conn, user in (
            ("fuzz-a", "conn-a", "fuzz-user"),
            ("fuzz-b", "conn-b", "other-user"),
        ):
            call(pb.JoinConversationRequest(conversation_id=cid, connection_id=conn, user_id=user))
    yield server
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.address) as opened:
        yield opened


def invoke(channel: grpc.Channel, method: str, data: bytes | list[bytes]) -> str:
    """Sends raw request bytes (a list: the requests of a bidirectional stream); returns the
    status code name after checking the invariants."""
    path = f"/{SERVICE.full_name}/{method}"
    streaming = SERVICE.methods_by_name[method].server_streaming
    failure: grpc.RpcError | None = None
    try:
        if SERVICE.methods_by_name[method].client_streaming:
            requests = data if isinstance(data, list) else [data]
            for _ in channel.stream_stream(path)(iter(requests), timeout=0.5):
                pass
        elif streaming:
            responses = channel.unary_stream(path)(data, timeout=0.3)
            for _ in responses:
                pass
        else:
            channel.unary_unary(path)(data, timeout=5)
    except grpc.RpcError as exc:
        failure = exc
    if failure is None:
        return "OK"
    code = failure.code()  # type: ignore[attr-defined]
    if streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "OK"  # a valid stream stays open: our deadline ended it
    if method == "StartConversation" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "QUEUED"  # a queued start waits for room: our deadline ended the wait
    assert code.name not in FORBIDDEN, (method, code, failure.details())  # type: ignore[attr-defined]
    assert "Traceback" not in (failure.details() or "")  # type: ignore[attr-defined]
    assert error_info(failure).reason  # type: ignore[arg-type]
    return str(code.name)


def serving(channel: grpc.Channel) -> bool:
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("method", METHODS)
def test_structured_requests_get_precise_answers(channel: grpc.Channel, tally, method: str) -> None:
    request_type = SERVICE.methods_by_name[method].input_type
    if SERVICE.methods_by_name[method].client_streaming:
        requests = st.lists(message_of(request_type), min_size=1, max_size=4)
    else:
        requests = message_of(request_type).map(lambda message: [message])

    @FUZZ_SETTINGS
    @given(requests)
    def attack(stream: list[Message]) -> None:
        data = [request.SerializeToString() for request in stream]
        tally.call(
            "fuzz (structured)", invoke(channel, method, data if len(stream) > 1 else data[0])
        )

    attack()
    assert serving(channel)
    tally.checked("fuzz: never UNKNOWN/INTERNAL, errors carry ErrorInfo", EXAMPLES)


@FUZZ_SETTINGS
@given(method=st.sampled_from(METHODS), data=st.binary(max_size=300))
def test_raw_bytes_get_precise_answers(
    channel: grpc.Channel, tally, method: str, data: bytes
) -> None:
    tally.call("fuzz (raw bytes)", invoke(channel, method, data))


def test_the_server_kept_serving_and_its_log_is_clean(
    channel: grpc.Channel, fuzz_server: ServerProcess, tally
) -> None:
    assert serving(channel)
    lines = fuzz_server.logs().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)  # one JSON object per line, nothing else
        assert "Traceback" not in line and "exception" not in record, line
        assert record.get("level") not in ("error", "critical"), line
    tally.checked("fuzz: log lines that are single JSON records without traceback", len(lines))
