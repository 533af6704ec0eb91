"""Finding conversations over gRPC: labels and titles set at start and changed by
UpdateConversation, returned everywhere a conversation is; SearchConversations over every
stored conversation, running or stopped, by each filter, newest activity first, page by page;
and what bad input gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from convclient import (
    AsyncConvsvcClient,
    ChangeKind,
    ConversationStatus,
    InvalidArgumentError,
    NotFoundError,
)
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import expect_error


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


@pytest.fixture
async def client(app: ConvsvcApp) -> AsyncIterator[AsyncConvsvcClient]:
    assert app.server is not None
    async with AsyncConvsvcClient(address=app.server.address) as connected:
        yield connected


async def ids(client: AsyncConvsvcClient, **filters: Any) -> list[str]:
    page = await client.search_conversations(**filters)
    return [c.conversation_id for c in page.items]


async def test_labels_and_title_are_set_at_start_changed_and_shown_everywhere(
    client: AsyncConvsvcClient,
) -> None:
    watch = client.watch_conversations()
    assert (await anext(watch)).snapshot is not None
    started = await client.start_conversation(
        "c", user_id="u", labels={"team": "red"}, title="Deploy"
    )
    assert (started.labels, started.title) == ({"team": "red"}, "Deploy")
    [listed] = (await client.list_conversations(user_id="u")).items
    assert listed.labels == {"team": "red"}
    # A later start (idempotent, or a restart) does not change them.
    await client.start_conversation("c", user_id="u", labels={"team": "blue"})
    assert (await client.get_conversation("c")).labels == {"team": "red"}

    updated = await client.update_conversation("c", labels={"team": "blue", "env": "prod"})
    assert (updated.labels, updated.title) == ({"team": "blue", "env": "prod"}, "Deploy")
    renamed = await client.update_conversation("c", title="Deploy v2")
    assert (renamed.labels["team"], renamed.title) == ("blue", "Deploy v2")
    async with asyncio.timeout(10):
        while True:
            changes = (await anext(watch)).changes
            updates = [c for c in changes if c.kind is ChangeKind.UPDATED]
            if updates:
                break
    assert updates[0].watched.conversation.labels == {"team": "blue", "env": "prod"}
    await watch.aclose()

    # A stopped conversation is updated in the store, and keeps it when it starts again.
    await client.close_conversation("c")
    await client.update_conversation("c", labels={})
    stopped = await client.get_conversation("c")
    assert (stopped.status, stopped.labels, stopped.title) == (
        ConversationStatus.STOPPED,
        {},
        "Deploy v2",
    )
    assert (await client.start_conversation("c", user_id="u")).title == "Deploy v2"


@pytest.fixture
async def exact_client(tmp_path: Path) -> AsyncIterator[AsyncConvsvcClient]:
    """A server that stores each conversation's activity with every commit (the default
    stores it at most once a second: see the store's test of that)."""
    async with running_app(tmp_path, activity_write_interval_seconds=0) as app:
        assert app.server is not None
        async with AsyncConvsvcClient(address=app.server.address) as connected:
            yield connected


async def test_search_covers_stored_conversations_by_every_filter(
    exact_client: AsyncConvsvcClient,
) -> None:
    client = exact_client
    before = datetime.now(UTC)
    await client.start_conversation("a", user_id="u1", labels={"team": "red"}, title="Deploy API")
    await client.start_conversation("b", user_id="u1", labels={"team": "blue"}, title="Docs")
    await client.start_conversation("c", user_id="u2", labels={"team": "red"}, title="deploy web")
    await client.close_conversation("a")
    # The newest activity comes first: b is the latest to have an event (its commit, which
    # the send's answer waited for, stored it).
    await client.send_event(message("hi"), conversation_id="b")
    assert (await ids(client))[0] == "b"
    assert await ids(client, user_id="u1") == ["b", "a"]
    assert await ids(client, statuses=[ConversationStatus.STOPPED]) == ["a"]
    assert sorted(await ids(client, statuses=[ConversationStatus.RUNNING])) == ["b", "c"]
    assert sorted(await ids(client, labels={"team": "red"})) == ["a", "c"]
    assert sorted(await ids(client, title_contains="DEPLOY")) == ["a", "c"]
    assert await ids(client, agent_states=["awaiting_user_input"], user_id="u1") == ["b"]
    assert sorted(await ids(client, agents=["echo"])) == ["a", "b", "c"]
    assert await ids(client, agents=["other"]) == []
    assert sorted(await ids(client, created_after=before)) == ["a", "b", "c"]
    assert await ids(client, created_before=before) == []
    assert await ids(client, active_after=datetime.now(UTC) + timedelta(hours=1)) == []
    [stopped] = (await client.search_conversations(conversation_ids=["a"])).items
    assert (stopped.status, stopped.labels, stopped.latest_event_id > 0) == (
        ConversationStatus.STOPPED,
        {"team": "red"},
        True,
    )
    [running] = (await client.search_conversations(conversation_ids=["b"])).items
    assert running.status is ConversationStatus.RUNNING and running.agent_state


async def test_search_pages_with_tokens_bound_to_their_filters(
    client: AsyncConvsvcClient,
) -> None:
    for n in range(7):
        await client.start_conversation(f"c{n}", user_id=f"u{n}", labels={"batch": "1"})
    seen: list[str] = []
    token = ""
    while True:
        page = await client.search_conversations(
            labels={"batch": "1"}, page_size=3, page_token=token
        )
        seen += [c.conversation_id for c in page.items]
        if not (token := page.next_page_token):
            break
    assert sorted(seen) == [f"c{n}" for n in range(7)] and len(seen) == 7
    first = await client.search_conversations(labels={"batch": "1"}, page_size=3)
    with pytest.raises(InvalidArgumentError) as other_filters:
        await client.search_conversations(page_size=3, page_token=first.next_page_token)
    assert other_filters.value.reason == "INVALID_PAGE_TOKEN"


async def test_users_find_only_their_own(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await client.start_conversation("mine", user_id="alice", labels={"k": "v"})
    await client.start_conversation("theirs", user_id="bob", labels={"k": "v"})
    assert await ids(client, user_id="alice", labels={"k": "v"}) == ["mine"]
    with pytest.raises(NotFoundError):
        await client.update_conversation("theirs", title="mine now", user_id="alice")
    assert (await client.get_conversation("theirs")).title == ""


async def test_bad_searches_and_updates_are_refused_precisely(
    client: AsyncConvsvcClient, stub: pb_grpc.ConversationServiceStub
) -> None:
    await client.start_conversation("c")
    cases = [
        (
            stub.StartConversation(
                pb.StartConversationRequest(conversation_id="d", labels={"Bad Key": "v"})
            ),
            "INVALID_LABELS",
        ),
        (
            stub.StartConversation(
                pb.StartConversationRequest(conversation_id="d", labels={"k": "v" * 300})
            ),
            "INVALID_LABELS",
        ),
        (
            stub.StartConversation(
                pb.StartConversationRequest(
                    conversation_id="d", labels={f"k{n}": "v" for n in range(65)}
                )
            ),
            "INVALID_LABELS",
        ),
        (
            stub.SearchConversations(
                pb.SearchConversationsRequest(statuses=[pb.CONVERSATION_STATUS_QUEUED])
            ),
            "INVALID_ARGUMENT",
        ),
        (
            stub.SearchConversations(pb.SearchConversationsRequest(statuses=[42])),  # type: ignore[list-item]
            "INVALID_ARGUMENT",
        ),
        (
            stub.SearchConversations(pb.SearchConversationsRequest(page_token="x")),
            "INVALID_PAGE_TOKEN",
        ),
        (
            stub.SearchConversations(pb.SearchConversationsRequest(title_contains="x" * 600)),
            "INVALID_ARGUMENT",
        ),
        (
            stub.UpdateConversation(pb.UpdateConversationRequest(conversation_id="c")),
            "INVALID_ARGUMENT",
        ),
        (
            stub.UpdateConversation(
                pb.UpdateConversationRequest(conversation_id="c", update_mask={"paths": ["agent"]})
            ),
            "INVALID_ARGUMENT",
        ),
    ]
    cases.append(
        (  # a huge path is not echoed whole (the status would outgrow gRPC's metadata)
            stub.UpdateConversation(
                pb.UpdateConversationRequest(
                    conversation_id="c", update_mask={"paths": ["y" * 20_000]}
                )
            ),
            "INVALID_ARGUMENT",
        )
    )
    for call, reason in cases:
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, reason)
    await expect_error(
        stub.UpdateConversation(
            pb.UpdateConversationRequest(conversation_id="nobody", update_mask={"paths": ["title"]})
        ),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    page = await client.list_audit_entries(conversation_id="c")
    assert "UpdateConversation" in [e.method for e in page.items]


async def test_a_restarted_server_finds_every_conversation_stopped_with_its_labels(
    tmp_path: Path,
) -> None:
    async with (
        running_app(tmp_path) as app,
        AsyncConvsvcClient(
            address=app.server.address  # type: ignore[union-attr]
        ) as client,
    ):
        await client.start_conversation("kept", labels={"k": "v"}, title="Kept")
    async with (
        running_app(tmp_path) as app,
        AsyncConvsvcClient(
            address=app.server.address  # type: ignore[union-attr]
        ) as client,
    ):
        [found] = (await client.search_conversations(labels={"k": "v"})).items
        assert (found.conversation_id, found.status, found.title) == (
            "kept",
            ConversationStatus.STOPPED,
            "Kept",
        )
        assert await ids(client, statuses=[ConversationStatus.RUNNING]) == []


async def test_updates_racing_closes_and_starts_leave_one_answer_each(
    client: AsyncConvsvcClient,
) -> None:
    """An update crossing a close or a restart of its conversation lands on the stored
    record, and the running copy (if any) shows what is stored."""
    for round_ in range(5):
        cid = f"race-{round_}"
        await client.start_conversation(cid, labels={"round": "0"})
        results = await asyncio.gather(
            client.update_conversation(cid, labels={"round": "1"}),
            client.close_conversation(cid),
            client.start_conversation(cid),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        got = await client.get_conversation(cid)
        [stored] = (await client.search_conversations(conversation_ids=[cid])).items
        assert got.labels == stored.labels == {"round": "1"}
