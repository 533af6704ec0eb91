"""ForkConversation over gRPC: the copied prefix, the fork's own life after it, the source
left alone, settings and secrets, idempotency, races and bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from convclient import (
    AlreadyExistsError,
    AsyncConvsvcClient,
    ConversationStatus,
    InvalidArgumentError,
    NotFoundError,
)
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import expect_error, grpc_events_until, log_violations


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


def said(payloads: list[dict[str, Any]], source: str) -> list[str]:
    return [
        p["args"]["content"]
        for p in payloads
        if p.get("action") == "message" and p.get("source") == source
    ]


@pytest.fixture
async def client(app: ConvsvcApp) -> AsyncIterator[AsyncConvsvcClient]:
    assert app.server is not None
    async with AsyncConvsvcClient(address=app.server.address) as connected:
        yield connected


async def talked(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub, cid: str, *texts: str
) -> list[dict[str, Any]]:
    """A conversation whose agent answered each text; its log."""
    await client.start_conversation(cid, user_id="alice", labels={"team": "red"}, title="T")
    for text in texts:
        await client.send_event(message(text), conversation_id=cid)
    return await grpc_events_until(
        stub, cid, lambda ps: said(ps, "agent") == list(texts), user_id="alice"
    )


async def test_a_fork_copies_the_prefix_and_goes_its_own_way(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    source = await talked(client, stub, "src", "one", "two")
    # Fork right after the agent answered "one".
    at = next(
        p["id"] for p in source if p.get("source") == "agent" and p["args"]["content"] == "one"
    )
    fork = await client.fork_conversation(
        "src", at_event_id=at, conversation_id="fork", user_id="alice"
    )
    assert (fork.conversation_id, fork.user_id, fork.agent) == ("fork", "alice", "echo")
    assert (fork.labels, fork.title) == ({"team": "red"}, "T")  # the source's
    await client.send_event(message("three"), conversation_id="fork")
    forked = await grpc_events_until(
        stub, "fork", lambda ps: said(ps, "agent") == ["one", "three"], user_id="alice"
    )
    # The copy: same ids, timestamps and contents; then the fork's own events.
    assert forked[: at + 1] == source[: at + 1]
    assert said(forked, "user") == ["one", "three"]
    assert not log_violations(forked)
    # The source is as it was.
    page = await client.search_events("src")
    assert [e.payload for e in page.items] == source
    assert (await client.get_conversation("src")).status is ConversationStatus.RUNNING


async def test_a_stopped_conversation_forks_at_its_newest_event(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await talked(client, stub, "src", "one")
    await client.close_conversation("src")
    stopped = await client.get_conversation("src")
    fork = await client.fork_conversation("src", conversation_id="fork", labels={"k": "v"})
    assert fork.labels == {"k": "v"}
    payloads = await grpc_events_until(
        stub, "fork", lambda ps: len(ps) > stopped.latest_event_id + 1
    )
    assert payloads[stopped.latest_event_id]["id"] == stopped.latest_event_id
    assert (await client.get_conversation("src")).status is ConversationStatus.STOPPED


async def test_a_retried_fork_copies_once_and_crossing_forks_make_one(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await talked(client, stub, "src", "one")
    first = await client.fork_conversation("src", conversation_id="fork", request_id="f1")
    again = await client.fork_conversation("src", conversation_id="fork", request_id="f1")
    assert again.conversation_id == first.conversation_id
    with pytest.raises(AlreadyExistsError) as exists:
        await client.fork_conversation("src", conversation_id="fork", request_id="f2")
    assert exists.value.reason == "CONVERSATION_EXISTS"
    outcomes = await asyncio.gather(
        *(client.fork_conversation("src", conversation_id="twin") for _ in range(6)),
        return_exceptions=True,
    )
    made = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(made) == 1, outcomes
    assert all(
        isinstance(o, AlreadyExistsError) for o in outcomes if isinstance(o, BaseException)
    ), outcomes
    page = await client.search_events("twin", page_size=1000)
    ids = [e.id for e in page.items]
    assert ids == list(range(len(ids)))  # copied once, no gap, no duplicate


async def test_bad_forks_are_refused_precisely(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await talked(client, stub, "src", "one")
    latest = (await client.get_conversation("src")).latest_event_id
    for at, reason in ((latest + 50, "EVENT_NOT_FOUND"), (-1, "EVENT_NOT_FOUND")):
        await expect_error(
            stub.ForkConversation(
                pb.ForkConversationRequest(
                    source_conversation_id="src", at_event_id=at, conversation_id="f"
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
        )
    await expect_error(
        stub.ForkConversation(
            pb.ForkConversationRequest(source_conversation_id="src", conversation_id="src")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stub.ForkConversation(pb.ForkConversationRequest(source_conversation_id="nobody")),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    with pytest.raises(NotFoundError):  # another user's conversation
        await client.fork_conversation("src", conversation_id="f", user_id="mallory")
    with pytest.raises(InvalidArgumentError):
        await client.fork_conversation("src", conversation_id="bad id")
    # Nothing was left behind by a refused fork.
    with pytest.raises(NotFoundError):
        await client.get_conversation("f")
    audit = await client.list_audit_entries()
    assert "ForkConversation" in [e.method for e in audit.items]


async def test_a_fork_racing_a_close_of_its_source_copies_a_consistent_prefix(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    for round_ in range(5):
        source = f"src-{round_}"
        await talked(client, stub, source, "one")
        fork, _ = await asyncio.gather(
            client.fork_conversation(source, conversation_id=f"fork-{round_}", user_id="alice"),
            client.close_conversation(source),
        )
        copied = await grpc_events_until(
            stub, fork.conversation_id, lambda ps: len(ps) > 0, user_id="alice"
        )
        page = await client.search_events(fork.conversation_id, page_size=1000)
        ids = [e.id for e in page.items]
        assert ids == list(range(len(ids))) and copied[0]["id"] == 0
        assert not log_violations([e.payload for e in page.items])
