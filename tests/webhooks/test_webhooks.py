"""Webhooks against a real HTTP endpoint: what is sent and signed, at least once through an
endpoint that is down, slow, restarted or failing, dead letters, the outbox across a server
restart, and the targets refused."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from convclient import (
    AsyncConvsvcClient,
    InvalidArgumentError,
    WebhookDelivery,
    WebhookDeliveryState,
    WebhookEventType,
)
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import expect_error
from tests.webhooks.receiver import Receiver, types

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
FAST = {
    "allow_private_targets": True,  # the endpoint is on loopback
    "retry_schedule_seconds": [0.2, 0.2, 0.2],
    "poll_interval_seconds": 0.05,
    "timeout_seconds": 1.0,
}


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver(secret=SECRET).start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ConvsvcApp, AsyncConvsvcClient]]:
    async with running_app(tmp_path, webhooks=FAST) as app:
        assert app.server is not None
        async with AsyncConvsvcClient(address=app.server.address) as client:
            yield app, client


async def deliveries_when(
    client: AsyncConvsvcClient, done: Any, **filters: Any
) -> list[WebhookDelivery]:
    """The deliveries listed once ``done(deliveries)`` holds. An attempt's outcome is
    written after the endpoint answered and no call streams it: this polls, briefly."""
    async with asyncio.timeout(20):
        while True:
            page = await client.list_webhook_deliveries(**filters)
            if done(page.items):
                return page.items
            await asyncio.sleep(0.05)


def of(received: list[Any], kind: str) -> list[Any]:
    return [r for r in received if r.payload["type"] == kind]


async def test_changes_are_posted_signed_and_listed(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    hook = await client.create_webhook(receiver.url, secret=SECRET, description="ops")
    assert hook.secret == SECRET and hook.webhook_id
    assert [w.secret for w in await client.list_webhooks()] == [""]  # shown once only
    await client.start_conversation("c", user_id="alice")
    await client.send_event(message("hi"), conversation_id="c")
    await client.close_conversation("c")
    got = await receiver.until(lambda r: of(r, "conversation.closed"))
    assert all(r.signed for r in got)  # every signature checks out on the receiver's side
    closed = of(got, "conversation.closed")[0]
    assert closed.payload["data"] == {"conversation_id": "c", "user_id": "alice"}
    waiting = of(got, "conversation.awaiting_user")
    assert waiting and waiting[0].payload["data"]["agent_state"] == "awaiting_user_input"
    listed = await deliveries_when(
        client,
        lambda ds: all(d.state is WebhookDeliveryState.DELIVERED for d in ds),
        conversation_id="c",
    )
    by_id = {d.delivery_id: d for d in listed}
    assert {r.delivery_id for r in got} <= set(by_id)
    delivered = by_id[closed.delivery_id]
    assert (delivered.state, delivered.attempts, delivered.last_status_code) == (
        WebhookDeliveryState.DELIVERED,
        1,
        200,
    )
    assert delivered.type is WebhookEventType.CLOSED and delivered.delivered_time is not None


async def test_an_endpoint_that_is_down_then_up_gets_everything(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    receiver.stop()  # down: connections refused
    await client.create_webhook(receiver.url, secret=SECRET, event_types=[WebhookEventType.CLOSED])
    for cid in ("a", "b"):
        await client.start_conversation(cid)
        await client.close_conversation(cid)
    # Attempts fail while it is down (the connection is refused) ...
    refused = await deliveries_when(
        client, lambda ds: len(ds) == 2 and all(d.attempts >= 1 for d in ds)
    )
    assert all(d.state is WebhookDeliveryState.PENDING for d in refused)
    assert all(d.last_error and d.last_status_code == 0 for d in refused)
    receiver.start()  # ... and it is back on the same port
    got = await receiver.until(lambda r: len(r) >= 2)
    assert sorted(r.payload["data"]["conversation_id"] for r in got) == ["a", "b"]
    assert types(got) == ["conversation.closed"] * 2  # the filter holds
    listed = await deliveries_when(
        client, lambda ds: all(d.state is WebhookDeliveryState.DELIVERED for d in ds)
    )
    assert len(listed) == 2 and all(d.attempts > 1 for d in listed)


async def test_a_failing_endpoint_s_deliveries_die_after_the_last_attempt(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    receiver.status = 500
    await client.create_webhook(receiver.url, secret=SECRET, event_types=["conversation.closed"])
    await client.start_conversation("c")
    await client.close_conversation("c")
    got = await receiver.until(lambda r: len(r) >= 4)  # the first attempt and three retries
    assert len({r.delivery_id for r in got}) == 1  # one message, the same id each time
    [delivery] = await deliveries_when(client, bool, states=[WebhookDeliveryState.DEAD])
    assert (delivery.attempts, delivery.last_status_code) == (4, 500)
    assert "500" in delivery.last_error and delivery.next_attempt_time is None


async def test_a_slow_endpoint_is_retried_with_the_same_message(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    receiver.delay = 1.5  # longer than the timeout: the first attempt fails
    await client.create_webhook(receiver.url, secret=SECRET, event_types=["conversation.closed"])
    await client.start_conversation("c")
    await client.close_conversation("c")
    first = await receiver.until(lambda r: len(r) >= 1)
    receiver.delay = 0
    again = await receiver.until(lambda r: len(r) >= 2)
    assert again[1].delivery_id == first[0].delivery_id  # at least once, one id
    [delivered] = await deliveries_when(client, bool, states=[WebhookDeliveryState.DELIVERED])
    assert delivered.attempts >= 2


async def test_the_outbox_survives_a_restart_and_an_evicted_conversation_is_told_apart(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.stop()
    async with running_app(
        tmp_path, webhooks=FAST, engine={"max_concurrent_conversations": 1}
    ) as app:
        assert app.server is not None
        async with AsyncConvsvcClient(address=app.server.address) as client:
            await client.create_webhook(
                receiver.url,
                secret=SECRET,
                event_types=[WebhookEventType.CLOSED, WebhookEventType.EVICTED],
            )
            await client.start_conversation("first", user_id="u")
            await client.start_conversation("second", user_id="u")  # evicts "first"
            await client.close_conversation("second")
    receiver.start()
    async with running_app(tmp_path, webhooks=FAST):
        got = await receiver.until(lambda r: len(r) >= 2)
    kinds = {r.payload["data"]["conversation_id"]: r.payload["type"] for r in got}
    assert kinds == {"first": "conversation.evicted", "second": "conversation.closed"}


async def test_a_fork_copies_history_without_notifying_it_again(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    await client.start_conversation("src")
    await client.send_event(message("hi"), conversation_id="src")
    await client.close_conversation("src")
    await client.create_webhook(receiver.url, secret=SECRET)
    await client.fork_conversation("src", conversation_id="fork")
    await client.close_conversation("fork")
    got = await receiver.until(lambda r: of(r, "conversation.closed"))
    about = {(r.payload["data"]["conversation_id"], r.payload["type"]) for r in got}
    assert ("fork", "conversation.closed") in about
    assert not {cid for cid, _ in about} - {"fork"}  # nothing about the source, copied or not


async def test_targets_that_are_not_public_are_refused_unless_allowed(tmp_path: Path) -> None:
    async with running_app(tmp_path) as app:  # the default: private targets refused
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            for url in (
                "http://127.0.0.1:8080/hook",
                "http://localhost/hook",
                "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/hook",
                "http://[::1]/hook",
            ):
                await expect_error(
                    stub.CreateWebhook(pb.CreateWebhookRequest(url=url)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "WEBHOOK_TARGET_NOT_ALLOWED",
                )
            for url in ("ftp://example.com/x", "http://user:pw@example.com/", "not a url"):
                await expect_error(
                    stub.CreateWebhook(pb.CreateWebhookRequest(url=url)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_WEBHOOK_URL",
                )
            await expect_error(
                stub.CreateWebhook(
                    pb.CreateWebhookRequest(url="http://127.0.0.1/", event_types=[99])  # type: ignore[list-item]
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
            )
            assert not (await stub.ListWebhooks(pb.ListWebhooksRequest())).webhooks


async def test_bad_secrets_and_unknown_endpoints(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    with pytest.raises(InvalidArgumentError) as short:
        await client.create_webhook(receiver.url, secret="whsec_c2hvcnQ=")
    assert short.value.reason == "INVALID_WEBHOOK_SECRET"
    hook = await client.create_webhook(receiver.url)
    assert hook.secret.startswith("whsec_")  # one was made
    assert await client.delete_webhook(hook.webhook_id)
    assert not await client.delete_webhook(hook.webhook_id)  # idempotent
    page = await client.list_audit_entries()
    assert {"CreateWebhook", "DeleteWebhook"} <= {e.method for e in page.items}


async def test_configured_endpoints_are_registered_at_every_start(
    tmp_path: Path, receiver: Receiver
) -> None:
    configured = {
        **FAST,
        "endpoints": [{"url": receiver.url, "event_types": ["conversation.closed"]}],
    }
    secrets_seen = []
    for _ in range(2):  # a restart keeps the endpoint and the secret made for it
        async with running_app(tmp_path, webhooks=configured) as app:
            [endpoint] = await app.store.list_webhooks()
            secrets_seen.append(endpoint.secret)
            assert endpoint.webhook_id.startswith("cfg_")
            assert [t.value for t in endpoint.event_types] == ["conversation.closed"]
    assert secrets_seen[0] == secrets_seen[1] and secrets_seen[0].startswith("whsec_")
    receiver.secret = secrets_seen[0]
    async with running_app(tmp_path, webhooks=configured) as app:
        assert app.server is not None
        async with AsyncConvsvcClient(address=app.server.address) as client:
            await client.start_conversation("c")
            await client.close_conversation("c")
            [got] = await receiver.until(lambda r: len(r) >= 1)
    assert got.signed and got.payload["type"] == "conversation.closed"


async def test_deliveries_are_listed_page_by_page(
    served: tuple[ConvsvcApp, AsyncConvsvcClient], receiver: Receiver
) -> None:
    _, client = served
    await client.create_webhook(receiver.url, secret=SECRET, event_types=["conversation.closed"])
    for cid in ("a", "b", "c"):
        await client.start_conversation(cid)
        await client.close_conversation(cid)
    await receiver.until(lambda r: len(r) >= 3)
    first = await client.list_webhook_deliveries(page_size=2)
    rest = await client.list_webhook_deliveries(page_size=2, page_token=first.next_page_token)
    listed = [d.conversation_id for d in first.items + rest.items]
    assert sorted(listed) == ["a", "b", "c"] and not rest.next_page_token
    with pytest.raises(InvalidArgumentError) as other_filters:
        await client.list_webhook_deliveries(
            page_size=2, page_token=first.next_page_token, conversation_id="a"
        )
    assert other_filters.value.reason == "INVALID_PAGE_TOKEN"
