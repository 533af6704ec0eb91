"""Webhooks in a cluster: every node sends from the shared outbox, and each delivery reaches
the endpoint once (leased by one node at a time), whichever node ran the conversation."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from convclient import AsyncConvsvcClient, WebhookDeliveryState, WebhookEventType
from tests.cluster.conftest import Cluster
from tests.webhooks.receiver import Receiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
FAST = {
    "CONVSVC_WEBHOOKS__ALLOW_PRIVATE_TARGETS": "true",
    "CONVSVC_WEBHOOKS__RETRY_SCHEDULE_SECONDS": "[0.2, 0.2, 0.2]",
    "CONVSVC_WEBHOOKS__POLL_INTERVAL_SECONDS": "0.05",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver(secret=SECRET).start()
    yield endpoint
    endpoint.stop()


async def test_each_delivery_reaches_the_endpoint_once_from_the_cluster(
    cluster: Callable[..., Cluster], receiver: Receiver
) -> None:
    a, b, c = cluster(3, **FAST).nodes
    async with AsyncConvsvcClient(address=a.address, route_to_owner=False) as client:
        await client.create_webhook(
            receiver.url, secret=SECRET, event_types=[WebhookEventType.CLOSED]
        )
    started = []
    for n, node in enumerate((a, b, c) * 4):
        async with AsyncConvsvcClient(address=node.address, route_to_owner=False) as on_node:
            cid = f"c{n}"
            await on_node.start_conversation(cid, user_id=f"u{n}")
            await on_node.close_conversation(cid)
            started.append(cid)
    got = await receiver.until(lambda r: len(r) >= len(started))
    assert all(r.signed for r in got)
    assert Counter(r.delivery_id for r in got).most_common(1)[0][1] == 1  # none twice
    assert sorted(r.payload["data"]["conversation_id"] for r in got) == sorted(started)
    async with AsyncConvsvcClient(address=b.address, route_to_owner=False) as client:
        async with asyncio.timeout(20):
            while True:  # each outcome is written after the endpoint's answer
                page = await client.list_webhook_deliveries(page_size=100)
                if all(d.state is WebhookDeliveryState.DELIVERED for d in page.items):
                    break
                await asyncio.sleep(0.05)
    assert len(page.items) == len(started)
    assert {d.attempts for d in page.items} == {1}
