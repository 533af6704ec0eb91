"""What a client remembers about where conversations run: learned from answers, forgotten
when stale, and bounded however many conversations it meets."""

from __future__ import annotations

import grpc
import pytest

from convclient.routing import OWNER_HEADER, Owners
from convsvc.v1 import conversation_service_pb2 as pb


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def joined(cid: str, connection_id: str, owner: str) -> pb.JoinConversationResponse:
    return pb.JoinConversationResponse(
        conversation=pb.Conversation(conversation_id=cid, owner_address=owner),
        connection=pb.Connection(connection_id=connection_id, conversation_id=cid),
    )


def test_answers_teach_owners_and_connections_and_a_close_forgets() -> None:
    owners = Owners()
    join = pb.JoinConversationRequest(conversation_id="c1", connection_id="tab")
    owners.learn("JoinConversation", join, joined("c1", "tab", "node-b:1"))
    send = pb.SendEventRequest(connection_id="tab")
    assert owners.conversation_of("SendEvent", send) == "c1"
    assert owners.owner("c1") == "node-b:1"
    # Lists, searches and tokens are answered anywhere: never routed.
    assert (
        owners.conversation_of("SearchEvents", pb.SearchEventsRequest(conversation_id="c1")) == ""
    )

    disconnect = pb.DisconnectConnectionRequest(connection_id="tab")
    owners.learn("DisconnectConnection", disconnect, pb.DisconnectConnectionResponse(removed=True))
    assert owners.conversation_of("SendEvent", send) == ""
    close = pb.CloseConversationRequest(conversation_id="c1")
    stopped = pb.CloseConversationResponse(conversation=pb.Conversation(conversation_id="c1"))
    owners.learn("CloseConversation", close, stopped)
    assert owners.owner("c1") == ""


def test_a_forwarded_answer_names_the_owner_in_its_header() -> None:
    owners = Owners()
    owners.learn_header("c1", [("content-type", "x"), (OWNER_HEADER, "node-c:1")])
    assert owners.owner("c1") == "node-c:1"
    owners.learn_header("c1", [])  # answered by the node called: nothing new
    assert owners.owner("c1") == "node-c:1"


@pytest.mark.parametrize(
    ("method", "code", "again", "forgotten"),
    [
        ("SendEvent", grpc.StatusCode.UNAVAILABLE, True, True),  # the node is gone
        ("SendEvent", grpc.StatusCode.DEADLINE_EXCEEDED, False, True),  # no time left
        ("SendEvent", grpc.StatusCode.NOT_FOUND, False, False),  # the owner's answer
        ("CompleteWithAgentLlm", grpc.StatusCode.UNAVAILABLE, False, True),  # not repeated
    ],
)
def test_a_failure_at_the_owner_forgets_it_and_repeats_only_what_is_safe(
    method: str, code: grpc.StatusCode, again: bool, forgotten: bool
) -> None:
    owners = Owners()
    owners.remember("c1", "node-b:1")
    assert owners.failed_at_owner(method, "c1", Failure(code)) is again
    assert (owners.owner("c1") == "") is forgotten


def test_what_a_client_remembers_is_bounded_and_keeps_the_recently_used() -> None:
    owners = Owners(limit=100)
    owners.remember("kept", "node-a:1")
    for n in range(1_000):
        owners.remember(f"c{n}", "node-b:1")
        owners.owner("kept")  # in use: never the oldest
        join = pb.JoinConversationRequest(conversation_id=f"c{n}", connection_id=f"tab{n}")
        owners.learn("JoinConversation", join, joined(f"c{n}", f"tab{n}", "node-b:1"))
    assert owners.owner("kept") == "node-a:1"
    assert owners.owner("c0") == ""
    assert owners.owner("c999") == "node-b:1"
    assert len(owners._owner) == 100 and len(owners._joined) == 100
