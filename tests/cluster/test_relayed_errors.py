"""What the caller of a forwarded call is told when the owner failed it: whose failure it
was, never the owner's trouble as the caller's node's own."""

from __future__ import annotations

import grpc
import pytest

from convsvc.cluster.routing import relayed_failure
from convsvc.errors import ConvsvcError, InvalidArgument, Unavailable
from convsvc.storage.postgres import Owner
from convsvc.transport.status import RelayedStatus, to_grpc_status
from convsvc.v1 import conversation_service_pb2 as pb

OWNER = Owner("node-a", "10.0.0.1:7000", True)
REQUEST = pb.SendEventRequest(conversation_id="conv")


def answered_by_owner(error: ConvsvcError) -> grpc.aio.AioRpcError:
    status = to_grpc_status(error)
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


def test_the_owner_s_database_trouble_reaches_the_caller_as_the_owner_s() -> None:
    failure = relayed_failure(
        answered_by_owner(
            Unavailable("the database cannot be reached", reason="DATABASE_UNAVAILABLE")
        ),
        REQUEST,
        OWNER,
    )
    assert isinstance(failure, Unavailable)
    assert failure.reason == "OWNER_UNAVAILABLE"
    assert failure.metadata == {
        "owner_address": "10.0.0.1:7000",
        "owner_node": "node-a",
        "conversation_id": "conv",
        "owner_reason": "DATABASE_UNAVAILABLE",
    }
    assert "10.0.0.1:7000" in failure.message and "the database cannot be reached" in (
        failure.message
    )


def test_an_owner_that_does_not_answer_is_unreachable_and_the_outcome_unknown() -> None:
    silent = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="ping"
    )
    failure = relayed_failure(silent, REQUEST, OWNER)
    assert isinstance(failure, Unavailable) and failure.reason == "OWNER_UNREACHABLE"
    assert failure.metadata["owner_address"] == "10.0.0.1:7000"
    assert "may or may not" in failure.message


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("moved", reason="OWNER_MOVED", metadata={"owner_address": "10.0.0.2:7000"}),
        InvalidArgument("bad event", reason="INVALID_EVENT"),
    ],
)
def test_answers_addressed_to_the_caller_keep_their_reason_and_name_the_owner(
    error: ConvsvcError,
) -> None:
    failure = relayed_failure(answered_by_owner(error), REQUEST, OWNER)
    assert isinstance(failure, RelayedStatus)
    info = failure.error_info()
    assert info is not None and info.reason == error.reason
    assert failure.details == error.message
    assert failure.code == to_grpc_status(error).code
    if error.reason == "OWNER_MOVED":
        assert info.metadata["owner_address"] == "10.0.0.2:7000"  # where to go next
    else:
        assert dict(info.metadata) == {
            "owner_address": "10.0.0.1:7000",
            "owner_node": "node-a",
            "conversation_id": "conv",
        }
