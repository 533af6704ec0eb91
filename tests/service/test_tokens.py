"""Scoped tokens and the audit log over a real server with a service token: every permission
boundary, and expired, revoked, forged and wrong-scope tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from convsvc.app import ConvsvcApp
from convsvc.config import Settings
from convsvc.transport.tokens import Permission, TokenAuthority, derived_signing_key
from convsvc.v1 import agent_worker_service_pb2 as worker_pb
from convsvc.v1 import agent_worker_service_pb2_grpc as worker_grpc
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import expect_error
from tests.service.test_grpc_api import message

SERVICE_TOKEN = "service-token-for-tests"
READ, WRITE, ADMIN = pb.PERMISSION_READ, pb.PERMISSION_WRITE, pb.PERMISSION_ADMIN
DENIED, UNAUTHENTICATED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


class As:
    """The service's stub, every call made with one bearer token."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._stub = pb_grpc.ConversationServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._stub, method)
        return lambda *args, **kwargs: call(*args, metadata=self._metadata, **kwargs)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[ConvsvcApp, grpc.aio.Channel]]:
    async with running_app(tmp_path / "data", auth_token=SERVICE_TOKEN) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            yield app, channel


async def start(service: As, cid: str, user: str) -> None:
    await service.StartConversation(pb.StartConversationRequest(conversation_id=cid, user_id=user))


async def mint(service: As, user: str, cids: list[str], *permissions: int, **extra: Any) -> str:
    minted = await service.MintToken(
        pb.MintTokenRequest(
            user_id=user, conversation_ids=cids, permissions=list(permissions), **extra
        )
    )
    assert minted.token_id and minted.expire_time.seconds > 0
    return str(minted.token)


async def test_a_conversation_token_reaches_that_conversation_and_nothing_else(secured) -> None:
    _, channel = secured
    service = As(channel, SERVICE_TOKEN)
    for cid, user in (("c1", "alice"), ("c2", "alice"), ("b1", "bob")):
        await service.StartConversation(
            pb.StartConversationRequest(conversation_id=cid, user_id=user)
        )
    browser = As(channel, await mint(service, "alice", ["c1"], READ, WRITE))

    # Read and write on c1, as alice (the token supplies the user).
    got = await browser.GetConversation(pb.GetConversationRequest(conversation_id="c1"))
    assert got.conversation.user_id == "alice"
    sent = await browser.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("hi")))
    page = await browser.SearchEvents(pb.SearchEventsRequest(conversation_id="c1"))
    assert sent.event_id in [e.id for e in page.events]
    listed = await browser.ListConversations(pb.ListConversationsRequest())
    assert [c.conversation_id for c in listed.conversations] == ["c1"]

    # Nothing else: another conversation, another user, admin calls, service-only calls.
    for call in (
        browser.GetConversation(pb.GetConversationRequest(conversation_id="c2")),
        browser.GetConversation(pb.GetConversationRequest(conversation_id="c1", user_id="bob")),
        browser.SendEvent(pb.SendEventRequest(conversation_id="c2", event=message("x"))),
        browser.ListConversations(pb.ListConversationsRequest(conversation_ids=["c1", "c2"])),
        browser.StartConversation(pb.StartConversationRequest(conversation_id="c1")),
        browser.CloseConversation(pb.CloseConversationRequest(conversation_id="c1")),
        browser.Heartbeat(pb.HeartbeatRequest(client_instance_id="i1")),
        browser.MintToken(pb.MintTokenRequest(user_id="alice", permissions=[ADMIN])),
        browser.ListAuditEntries(pb.ListAuditEntriesRequest()),
        browser.JoinConversation(
            pb.JoinConversationRequest(conversation_id="c2", connection_id="s9")
        ),
    ):
        await expect_error(call, DENIED, "TOKEN_SCOPE")
    stream = browser.StreamEvents(pb.StreamEventsRequest(conversation_id="b1"))
    await expect_error(stream.read(), DENIED, "TOKEN_SCOPE")
    watch = browser.WatchConversations(pb.WatchConversationsRequest(conversation_ids=["c2"]))
    await expect_error(watch.read(), DENIED, "TOKEN_SCOPE")
    # Not the worker protocol either (the service token only).
    worker = worker_grpc.AgentWorkerServiceStub(channel).Attach(
        metadata=(("authorization", f"Bearer {await mint(service, 'alice', [], ADMIN)}"),)
    )
    await worker.write(worker_pb.AttachRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await worker.read()
    assert caught.value.code() == UNAUTHENTICATED


async def test_connect_and_watch_with_a_scoped_token(secured) -> None:
    _, channel = secured
    service = As(channel, SERVICE_TOKEN)
    await service.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", user_id="alice")
    )
    await service.StartConversation(
        pb.StartConversationRequest(conversation_id="c2", user_id="alice")
    )
    browser = As(channel, await mint(service, "alice", ["c1"], READ, WRITE))

    watch = browser.WatchConversations(pb.WatchConversationsRequest())
    snapshot = await asyncio.wait_for(watch.read(), 10)
    assert [w.conversation.conversation_id for w in snapshot.snapshot] == ["c1"]
    watch.cancel()

    call = browser.Connect()
    await call.write(
        pb.ConnectRequest(open=pb.ConnectOpen(conversation_id="c1", connection_id="b1"))
    )
    opened = await asyncio.wait_for(call.read(), 10)
    assert opened.opened.connection.user_id == "alice"
    await call.write(pb.ConnectRequest(send=pb.ConnectSend(event=message("hi"), request_id="r1")))
    while (response := await asyncio.wait_for(call.read(), 10)).WhichOneof(
        "response"
    ) != "send_result":
        pass
    assert response.send_result.event_id >= 0
    await call.done_writing()
    while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
        pass  # the events the send appended, then the end
    assert await call.code() == grpc.StatusCode.OK

    other = browser.Connect()
    await other.write(pb.ConnectRequest(open=pb.ConnectOpen(conversation_id="c2")))
    await expect_error(other.read(), DENIED, "TOKEN_SCOPE")


async def test_permissions_read_write_and_admin(secured) -> None:
    _, channel = secured
    service = As(channel, SERVICE_TOKEN)
    await service.StartConversation(
        pb.StartConversationRequest(conversation_id="mine", user_id="alice")
    )
    await service.StartConversation(
        pb.StartConversationRequest(conversation_id="bobs", user_id="bob")
    )
    reader = As(channel, await mint(service, "alice", [], READ))
    admin = As(channel, await mint(service, "alice", [], ADMIN, READ))

    await reader.GetConversation(pb.GetConversationRequest(conversation_id="mine"))
    await expect_error(
        reader.SendEvent(pb.SendEventRequest(conversation_id="mine", event=message("x"))),
        DENIED,
        "TOKEN_SCOPE",
    )
    # A token for all of alice's conversations may start new ones, as alice.
    started = await admin.StartConversation(pb.StartConversationRequest(conversation_id="new"))
    assert started.conversation.user_id == "alice"
    # ...and still sees another user's conversation as missing.
    await expect_error(
        admin.CloseConversation(pb.CloseConversationRequest(conversation_id="bobs")),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )


async def test_expired_forged_and_revoked_tokens_are_refused(secured, tmp_path) -> None:
    app, channel = secured
    service = As(channel, SERVICE_TOKEN)
    await service.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", user_id="alice")
    )
    get = pb.GetConversationRequest(conversation_id="c1")

    authority = TokenAuthority(derived_signing_key(SERVICE_TOKEN), 3600)
    expired, _ = authority.mint(
        "alice", [], [Permission.READ], 60, now=datetime.now(UTC) - timedelta(hours=1)
    )
    await expect_error(As(channel, expired).GetConversation(get), UNAUTHENTICATED, "TOKEN_EXPIRED")

    forged, _ = TokenAuthority(b"another key, as long as the real one", 3600).mint(
        "alice", [], [Permission.READ], 60
    )
    valid = await mint(service, "alice", ["c1"], READ)
    header, _, signature = valid.split(".")
    widened = jwt.encode(
        {**jwt.decode(valid, options={"verify_signature": False}), "cids": []}, "k" * 32
    ).split(".")[1]
    unsigned = jwt.encode({"sub": "alice", "perms": ["admin"]}, None, algorithm="none")
    for bad in (forged, f"{header}.{widened}.{signature}", unsigned, "a.b.c"):
        await expect_error(As(channel, bad).GetConversation(get), UNAUTHENTICATED, "TOKEN_INVALID")
    await expect_error(
        As(channel, "not-a-token").GetConversation(get), UNAUTHENTICATED, "UNAUTHENTICATED"
    )

    minted = await service.MintToken(
        pb.MintTokenRequest(user_id="alice", permissions=[READ], conversation_ids=["c1"])
    )
    revocable = As(channel, minted.token)
    await revocable.GetConversation(get)
    await service.RevokeToken(pb.RevokeTokenRequest(token_id=minted.token_id))
    await service.RevokeToken(pb.RevokeTokenRequest(token_id=minted.token_id))  # idempotent
    await expect_error(revocable.GetConversation(get), UNAUTHENTICATED, "TOKEN_REVOKED")

    # A revocation survives a restart.
    await app.stop()
    async with running_app(app.settings.data_dir, auth_token=SERVICE_TOKEN) as again:
        assert again.server is not None
        async with grpc.aio.insecure_channel(again.server.address) as fresh:
            await expect_error(
                As(fresh, minted.token).GetConversation(get), UNAUTHENTICATED, "TOKEN_REVOKED"
            )


async def test_mint_checks_its_request(secured) -> None:
    _, channel = secured
    service = As(channel, SERVICE_TOKEN)
    for request, reason in (
        (pb.MintTokenRequest(permissions=[READ]), "INVALID_ARGUMENT"),  # no user
        (pb.MintTokenRequest(user_id="alice"), "INVALID_ARGUMENT"),  # no permission
        (
            pb.MintTokenRequest(user_id="alice", permissions=[READ], ttl_seconds=10**9),
            "INVALID_ARGUMENT",
        ),
        (
            pb.MintTokenRequest(user_id="alice", permissions=[READ], conversation_ids=["bad id"]),
            "INVALID_ID",
        ),
    ):
        await expect_error(service.MintToken(request), grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_a_signing_key_of_its_own_works_without_a_service_token(tmp_path) -> None:
    key = "an operator's signing key, 32+ bytes long"
    async with running_app(tmp_path / "data", token_signing_key=key) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            anyone = pb_grpc.ConversationServiceStub(channel)  # no auth: trusted
            await anyone.StartConversation(
                pb.StartConversationRequest(conversation_id="c1", user_id="alice")
            )
            minted = await anyone.MintToken(pb.MintTokenRequest(user_id="bob", permissions=[READ]))
            # A presented token is still held to its scope.
            await expect_error(
                As(channel, minted.token).GetConversation(
                    pb.GetConversationRequest(conversation_id="c1")
                ),
                grpc.StatusCode.NOT_FOUND,
                "CONVERSATION_NOT_FOUND",
            )
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Settings(token_signing_key="short")


async def test_without_a_signing_key_no_token_is_minted(app) -> None:
    assert app.server is not None
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await expect_error(
            stub.MintToken(pb.MintTokenRequest(user_id="alice", permissions=[READ])),
            grpc.StatusCode.FAILED_PRECONDITION,
            "TOKENS_NOT_CONFIGURED",
        )


async def test_the_audit_log_records_who_did_what_and_survives_a_restart(secured) -> None:
    app, channel = secured
    service = As(channel, SERVICE_TOKEN)
    await service.StartConversation(
        pb.StartConversationRequest(conversation_id="c1", user_id="alice", request_id="start-1")
    )
    minted = await service.MintToken(
        pb.MintTokenRequest(user_id="alice", conversation_ids=["c1"], permissions=[WRITE])
    )
    browser = As(channel, minted.token)
    await browser.SendEvent(
        pb.SendEventRequest(conversation_id="c1", event=message("hi"), request_id="send-1")
    )
    await expect_error(
        browser.CloseConversation(pb.CloseConversationRequest(conversation_id="c1")),
        DENIED,
        "TOKEN_SCOPE",
    )
    await service.RevokeToken(pb.RevokeTokenRequest(token_id=minted.token_id))
    await expect_error(
        browser.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("late"))),
        UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    await service.GetConversation(pb.GetConversationRequest(conversation_id="c1"))  # not audited

    async def entries(stub: As, **filters: Any) -> list[pb.AuditEntry]:
        found: list[pb.AuditEntry] = []
        token = ""
        while True:
            page = await stub.ListAuditEntries(
                pb.ListAuditEntriesRequest(page_size=2, page_token=token, **filters)
            )
            found += page.entries
            if not (token := page.next_page_token):
                return found

    logged = await entries(service)  # it sees every entry of a call already answered
    assert [(e.method, e.credential, e.code) for e in logged] == [
        ("StartConversation", "service", "OK"),
        ("MintToken", "service", "OK"),
        ("SendEvent", "token", "OK"),
        ("CloseConversation", "token", "PERMISSION_DENIED"),
        ("RevokeToken", "service", "OK"),
        ("SendEvent", "unauthenticated", "UNAUTHENTICATED"),
    ]
    start, mint_entry, send, close, revoke, refused = logged
    assert refused.reason == "TOKEN_REVOKED"
    assert (start.user_id, start.conversation_id, start.request_id) == ("alice", "c1", "start-1")
    assert mint_entry.affected_token_id == minted.token_id == revoke.affected_token_id
    assert (send.subject, send.token_id, send.user_id) == ("alice", minted.token_id, "alice")
    assert send.request_id == "send-1" and close.reason == "TOKEN_SCOPE"
    assert [e.sequence for e in logged] == sorted(e.sequence for e in logged)
    assert [e.method for e in await entries(service, user_id="alice")] == [
        "StartConversation",
        "MintToken",
        "SendEvent",
        "CloseConversation",
    ]

    await app.stop()
    async with running_app(app.settings.data_dir, auth_token=SERVICE_TOKEN) as again:
        assert again.server is not None
        async with grpc.aio.insecure_channel(again.server.address) as fresh:
            assert len(await entries(As(fresh, SERVICE_TOKEN))) == 6
