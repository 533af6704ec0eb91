"""The webhook outbox on PostgreSQL: the rows a commit adds, and the reads and updates of
the nodes that send them (each delivery leased by one node at a time: sent once per
cluster, and again by another node only when the one holding it went quiet)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

import asyncpg

from convsvc.domain import (
    DeliveryState,
    Notification,
    WebhookDelivery,
    WebhookEndpoint,
)
from convsvc.storage.outbox import DELIVERY_COLUMNS, WEBHOOK_COLUMNS, delivery, endpoint, message

T = TypeVar("T")

_FAN_OUT = """
INSERT INTO webhook_deliveries (delivery_id, webhook_id, type, conversation_id, payload, state,
                                create_time, next_attempt_time)
SELECT n.message_id || '_' || w.webhook_id, w.webhook_id, n.type, n.conversation_id, n.payload,
       'pending', n.time, n.time
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
         AS n(message_id, type, conversation_id, payload, time)
JOIN webhooks w ON cardinality(w.event_types) = 0 OR n.type = ANY(w.event_types)
"""


async def fan_out(conn: asyncpg.Connection, notifications: Sequence[Notification]) -> None:
    """Adds the deliveries of ``notifications`` (in the caller's transaction)."""
    if not notifications:
        return
    messages = [message(n) for n in notifications]
    await conn.execute(
        _FAN_OUT,
        [m[0] for m in messages],
        [n.type.value for n in notifications],
        [n.conversation_id for n in notifications],
        [m[1] for m in messages],
        [n.time for n in notifications],
    )


class PostgresOutbox:
    """The outbox half of PostgresStore (which provides the pool)."""

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        raise NotImplementedError  # PostgresStore's

    async def save_webhook(self, webhook: WebhookEndpoint) -> None:
        await self.run(
            lambda conn: conn.execute(
                f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (webhook_id) DO UPDATE SET url = excluded.url, "
                "event_types = excluded.event_types, secret = excluded.secret, "
                "description = excluded.description",
                webhook.webhook_id,
                webhook.url,
                [t.value for t in webhook.event_types],
                webhook.secret,
                webhook.description,
                webhook.create_time,
            )
        )

    async def list_webhooks(self) -> list[WebhookEndpoint]:
        rows = await self.run(
            lambda conn: conn.fetch(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY webhook_id")
        )
        return [endpoint(row) for row in rows]

    async def delete_webhook(self, webhook_id: str) -> bool:
        async def delete(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                gone = await conn.execute("DELETE FROM webhooks WHERE webhook_id = $1", webhook_id)
                await conn.execute(
                    "UPDATE webhook_deliveries SET state = 'dead', next_attempt_time = NULL, "
                    "last_error = 'the webhook was deleted' "
                    "WHERE webhook_id = $1 AND state = 'pending'",
                    webhook_id,
                )
            return str(gone) != "DELETE 0"

        return await self.run(delete)

    async def claim_deliveries(
        self, node: str, limit: int, lease_seconds: float
    ) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
        columns = ", ".join(f"d.{c}" for c in DELIVERY_COLUMNS.split(", "))
        hooks = ", ".join(f"w.{c}" for c in WEBHOOK_COLUMNS.split(", "))
        rows = await self.run(
            lambda conn: conn.fetch(
                "WITH due AS (SELECT delivery_id FROM webhook_deliveries "
                "WHERE state = 'pending' AND next_attempt_time <= now() "
                "AND (lease_until IS NULL OR lease_until < now()) "
                "ORDER BY next_attempt_time LIMIT $2 FOR UPDATE SKIP LOCKED) "
                "UPDATE webhook_deliveries d SET lease_node = $1, "
                "lease_until = now() + make_interval(secs => $3) "
                "FROM due, webhooks w "
                "WHERE d.delivery_id = due.delivery_id AND w.webhook_id = d.webhook_id "
                f"RETURNING {columns}, {hooks}",
                node,
                limit,
                lease_seconds,
            )
        )
        split = len(DELIVERY_COLUMNS.split(", "))
        return [(delivery(tuple(r)[:split]), endpoint(tuple(r)[split:])) for r in rows]

    async def finish_attempt(
        self,
        delivery_id: str,
        node: str,
        state: DeliveryState,
        status_code: int,
        error: str,
        next_attempt_time: datetime | None,
    ) -> None:
        await self.run(
            lambda conn: conn.execute(
                "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, "
                "last_status_code = $2, last_error = $3, next_attempt_time = $4, "
                "delivered_time = CASE WHEN $1 = 'delivered' THEN now() END, "
                "lease_node = NULL, lease_until = NULL "
                "WHERE delivery_id = $5 AND lease_node = $6 AND state = 'pending'",
                state.value,
                status_code,
                error,
                next_attempt_time,
                delivery_id,
                node,
            )
        )
