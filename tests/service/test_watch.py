"""WatchConversations over a real server: snapshot, live changes, filters, resume, slow
watchers."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from convsvc.v1 import conversation_service_pb2 as pb
from tests.conftest import running_app
from tests.helpers import error_info, expect_error
from tests.service.test_grpc_api import message

KIND = pb.ConversationChangeKind


class Watch:
    """A WatchConversations call read with a deadline per response."""

    def __init__(self, stub, **request) -> None:
        self.call = stub.WatchConversations(pb.WatchConversationsRequest(**request))
        self.token = ""
        self.pending: list[pb.ConversationChange] = []

    async def next(self) -> pb.WatchConversationsResponse:
        response = await asyncio.wait_for(self.call.read(), 10)
        assert response is not grpc.aio.EOF
        if response.resume_token:
            self.token = response.resume_token
        return response

    async def snapshot(self) -> dict[str, pb.WatchedConversation]:
        seen: dict[str, pb.WatchedConversation] = {}
        while True:
            response = await self.next()
            assert not response.changes
            seen.update((w.conversation.conversation_id, w) for w in response.snapshot)
            if response.snapshot_complete:
                return seen

    async def changes_until(self, kind: int, cid: str) -> list[pb.ConversationChange]:
        """Changes up to the first of ``kind`` for ``cid``; later ones are kept for the
        next call."""
        changes = self.pending
        while not any(self._is(c, kind, cid) for c in changes):
            response = await self.next()
            assert not response.snapshot and not response.snapshot_complete
            changes += response.changes
        end = next(i for i, c in enumerate(changes) if self._is(c, kind, cid)) + 1
        self.pending = changes[end:]
        return changes[:end]

    @staticmethod
    def _is(change: pb.ConversationChange, kind: int, cid: str) -> bool:
        return change.kind == kind and change.watched.conversation.conversation_id == cid


async def test_snapshot_then_every_change_of_a_conversation_life(stub) -> None:
    await stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="old", connection_id="s0", user_id="alice")
    )
    watch = Watch(stub, user_id="alice")
    snapshot = await watch.snapshot()
    assert list(snapshot) == ["old"]
    assert list(snapshot["old"].connection_ids) == ["s0"]
    assert snapshot["old"].conversation.connection_count == 1

    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1", user_id="alice"))
    changes = await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_STATUS_CHANGED, "c1")
    changes = [c for c in changes if c.watched.conversation.conversation_id == "c1"]
    created = changes[0]
    assert created.kind == KIND.CONVERSATION_CHANGE_KIND_CREATED
    assert created.watched.conversation.status == pb.CONVERSATION_STATUS_STARTING
    assert changes[-1].watched.conversation.status == pb.CONVERSATION_STATUS_RUNNING

    await stub.JoinConversation(
        pb.JoinConversationRequest(conversation_id="c1", connection_id="s1", user_id="alice")
    )
    joined = (await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED, "c1"))[
        -1
    ]
    assert list(joined.watched.connection_ids) == ["s1"]

    await stub.SendEvent(pb.SendEventRequest(connection_id="s1", event=message("hi")))
    states = []
    while "awaiting_user_input" not in states[1:]:
        changes = await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_AGENT_STATE_CHANGED, "c1")
        states += [
            c.watched.conversation.agent_state
            for c in changes
            if c.watched.conversation.conversation_id == "c1"
            and c.kind == KIND.CONVERSATION_CHANGE_KIND_AGENT_STATE_CHANGED
        ]
    assert states[-2:] == ["running", "awaiting_user_input"]

    await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="c1"))
    closed = (await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_CLOSED, "c1"))[-1]
    assert closed.watched.conversation.status == pb.CONVERSATION_STATUS_STOPPED
    assert not closed.watched.connection_ids
    watch.call.cancel()


async def test_a_user_watch_sees_only_that_user_and_a_trusted_one_sees_all(stub) -> None:
    mine = Watch(stub, user_id="alice")
    everyone = Watch(stub)
    only_c2 = Watch(stub, conversation_ids=["c2"])
    for watch in (mine, everyone, only_c2):
        assert await watch.snapshot() == {}

    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1", user_id="bob"))
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c2", user_id="alice"))

    seen = await mine.changes_until(KIND.CONVERSATION_CHANGE_KIND_CREATED, "c2")
    assert {c.watched.conversation.conversation_id for c in seen} == {"c2"}
    await everyone.changes_until(KIND.CONVERSATION_CHANGE_KIND_CREATED, "c2")
    seen = await only_c2.changes_until(KIND.CONVERSATION_CHANGE_KIND_CREATED, "c2")
    assert {c.watched.conversation.conversation_id for c in seen} == {"c2"}
    for watch in (mine, everyone, only_c2):
        watch.call.cancel()


async def test_resume_continues_after_the_token_without_a_gap_or_a_snapshot(stub) -> None:
    first = Watch(stub)
    await first.snapshot()
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
    await first.changes_until(KIND.CONVERSATION_CHANGE_KIND_CREATED, "c1")
    first.call.cancel()

    # What happens while nobody watches...
    for n in range(5):
        await stub.JoinConversation(
            pb.JoinConversationRequest(conversation_id="c1", connection_id=f"s{n}")
        )

    resumed = Watch(stub, resume_token=first.token)
    changes = await resumed.changes_until(KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED, "c1")
    while len(changes[-1].watched.connection_ids) < 5:
        changes += await resumed.changes_until(
            KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED, "c1"
        )
    counts = [
        len(c.watched.connection_ids)
        for c in changes
        if c.kind == KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED
    ]
    assert counts == [1, 2, 3, 4, 5]  # each change once, in order
    resumed.call.cancel()


async def test_a_token_the_server_cannot_resume_from_gets_a_new_snapshot(tmp_path) -> None:
    async with (
        running_app(tmp_path / "one") as app,
        grpc.aio.insecure_channel(app.server.address) as channel,
    ):
        from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
        # A token from another server process (or one restarted) cannot be resumed.
        watch = Watch(stub, resume_token="0123456789abcdef.42")
        assert list(await watch.snapshot()) == ["c1"]
        assert watch.token and watch.token != "0123456789abcdef.42"
        watch.call.cancel()

        feed = watch.token.partition(".")[0]
        # Digits that are not ASCII digits (str.isdigit takes them) are not a sequence number.
        for bad in ("not a token", "x" * 100, f"{feed}.\u00b2", f"{feed}.\u0663"):
            call = stub.WatchConversations(pb.WatchConversationsRequest(resume_token=bad))
            await expect_error(
                call.read(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESUME_TOKEN"
            )


async def test_a_watcher_that_falls_behind_is_dropped_and_resumes(make_engine) -> None:
    harness = await make_engine(watch_history=100, watch_max_lag=20)
    engine = harness.engine
    watch = engine.queries.watch_conversations()
    first = await anext(watch)
    assert first.snapshot == []

    for n in range(30):  # 30 changes, not read
        await engine.start_conversation(conversation_id=f"c{n}", user_id=f"u{n}")

    from convsvc.engine.watch import WatcherTooSlow

    with pytest.raises(WatcherTooSlow) as caught:
        await anext(watch)
    token = caught.value.metadata["resume_token"]
    assert token == first.resume_token

    resumed = engine.queries.watch_conversations(resume_token=token)
    update = await anext(resumed)
    assert update.snapshot is None  # resumed: the changes follow the token, none missed
    created = [c.watched.view.conversation_id for c in update.changes if c.kind == "created"]
    assert created[:5] == ["c0", "c1", "c2", "c3", "c4"]
    await resumed.aclose()


async def test_shutdown_ends_watches_with_unavailable(tmp_path) -> None:
    async with running_app(tmp_path / "data") as app:
        channel = grpc.aio.insecure_channel(app.server.address)
        from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

        watch = Watch(pb_grpc.ConversationServiceStub(channel))
        await watch.snapshot()
        stopping = asyncio.create_task(app.stop())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch.next()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "SHUTTING_DOWN"
        await stopping
        await channel.close()
