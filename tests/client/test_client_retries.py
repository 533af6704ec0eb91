"""Retries and deadlines, against a scripted server that fails on purpose.

pytest-grpc runs the server: it hosts synchronous servicers, which suits a fault-injecting
stand-in (the real service is asyncio and is tested through the `app` fixture instead).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from convclient import ConvsvcClient, InvalidArgumentError, ServiceUnavailableError
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

grpc_max_workers = 4  # read by pytest-grpc: a stalled call must not block the next test
HI = {"action": "message", "args": {"content": "hi"}}


class ScriptedService(pb_grpc.ConversationServiceServicer):
    """Fails each new request id a set number of times with UNAVAILABLE, then answers."""

    def __init__(self) -> None:
        self.failures_before_success = 0
        self.attempts: defaultdict[str, int] = defaultdict(int)
        self.release = threading.Event()

    def SendEvent(self, request: pb.SendEventRequest, context: Any) -> pb.SendEventResponse:
        self.attempts[request.request_id] += 1
        if self.attempts[request.request_id] <= self.failures_before_success:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if not request.event.fields.get("action"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no action")
        return pb.SendEventResponse(conversation_id=request.conversation_id, event_id=7)

    def GetConversation(
        self, request: pb.GetConversationRequest, context: Any
    ) -> pb.GetConversationResponse:
        self.attempts[request.conversation_id] += 1
        self.release.wait(30)  # stalls until the test releases it
        return pb.GetConversationResponse()


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    return pb_grpc.add_ConversationServiceServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer() -> ScriptedService:
    return ScriptedService()


@pytest.fixture
def service(grpc_servicer: ScriptedService, grpc_server: Any) -> Iterator[ScriptedService]:
    grpc_servicer.attempts.clear()
    grpc_servicer.failures_before_success = 0
    grpc_servicer.release.clear()
    yield grpc_servicer
    grpc_servicer.release.set()


@pytest.fixture
def client(grpc_addr: str, service: ScriptedService) -> Iterator[ConvsvcClient]:
    with ConvsvcClient(address=grpc_addr, timeout_seconds=10) as opened:
        yield opened


def test_unavailable_is_retried_with_the_same_request_id(
    client: ConvsvcClient, service: ScriptedService
) -> None:
    service.failures_before_success = 2
    sent = client.send_event(HI, conversation_id="c1")
    assert sent.event_id == 7
    assert list(service.attempts.values()) == [3]  # one request id, three attempts


def test_other_errors_are_not_retried(client: ConvsvcClient, service: ScriptedService) -> None:
    with pytest.raises(InvalidArgumentError):
        client.send_event({"args": {}}, conversation_id="c1", request_id="r-1")
    assert service.attempts["r-1"] == 1


def test_retries_stop_when_the_service_stays_unavailable(
    client: ConvsvcClient, service: ScriptedService
) -> None:
    service.failures_before_success = 100
    with pytest.raises(ServiceUnavailableError) as caught:
        client.send_event(HI, conversation_id="c1", request_id="r-2")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert 1 < service.attempts["r-2"] <= 5


def test_a_call_that_gets_no_answer_ends_at_its_deadline(
    grpc_addr: str, service: ScriptedService
) -> None:
    with (
        ConvsvcClient(address=grpc_addr, timeout_seconds=0.5) as client,
        pytest.raises(ServiceUnavailableError) as caught,
    ):
        client.get_conversation("stalled")
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer within 0.5 s" in str(caught.value)
    assert service.attempts["stalled"] == 1  # a deadline is not retried
