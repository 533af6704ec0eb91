"""The webhook outbox on SQLite: its tables, the rows a commit adds, and the reads and
updates of the one node that sends them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from convsvc.domain import (
    DeliveryState,
    Notification,
    WebhookDelivery,
    WebhookEndpoint,
)
from convsvc.storage.outbox import DELIVERY_COLUMNS, WEBHOOK_COLUMNS, delivery, endpoint, message

T = TypeVar("T")

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    webhook_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    event_types TEXT NOT NULL,
    secret TEXT NOT NULL,
    description TEXT NOT NULL,
    create_time TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    type TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    create_time TEXT NOT NULL,
    next_attempt_time TEXT,
    last_status_code INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    delivered_time TEXT,
    lease_node TEXT,
    lease_until TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhook_deliveries_due
    ON webhook_deliveries (next_attempt_time) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_time
    ON webhook_deliveries (create_time DESC, delivery_id DESC);
"""

# One delivery per endpoint that wants the type (an endpoint with no types wants all).
_FAN_OUT = """
INSERT INTO webhook_deliveries (delivery_id, webhook_id, type, conversation_id, payload, state,
                                create_time, next_attempt_time)
SELECT ?1 || '_' || w.webhook_id, w.webhook_id, ?2, ?3, ?4, 'pending', ?5, ?5
FROM webhooks w
WHERE w.event_types = '[]' OR EXISTS (SELECT 1 FROM json_each(w.event_types) WHERE value = ?2)
"""


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def fan_out(writer: sqlite3.Connection, notifications: Sequence[Notification]) -> None:
    """Adds the deliveries of ``notifications`` (in the caller's transaction)."""
    rows = []
    for notification in notifications:
        message_id, body = message(notification)
        rows.append(
            (
                message_id,
                notification.type.value,
                notification.conversation_id,
                body,
                _iso(notification.time),
            )
        )
    if rows:
        writer.executemany(_FAN_OUT, rows)


class SqliteOutbox:
    """The outbox half of SqliteStore (which provides the writer thread and the reads)."""

    _writer: sqlite3.Connection | None

    async def _on_writer_thread(self, work: Callable[[], T]) -> T:
        raise NotImplementedError  # SqliteStore's

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        raise NotImplementedError  # SqliteStore's

    async def _write_now(self, sql: str, args: tuple[Any, ...]) -> int:
        writer = self._writer
        assert writer is not None
        return await self._on_writer_thread(lambda: int(writer.execute(sql, args).rowcount))

    async def save_webhook(self, webhook: WebhookEndpoint) -> None:
        await self._write_now(
            f"INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (webhook_id) DO UPDATE SET url = excluded.url, "
            "event_types = excluded.event_types, secret = excluded.secret, "
            "description = excluded.description",
            (
                webhook.webhook_id,
                webhook.url,
                json.dumps([t.value for t in webhook.event_types]),
                webhook.secret,
                webhook.description,
                _iso(webhook.create_time),
            ),
        )

    async def list_webhooks(self) -> list[WebhookEndpoint]:
        rows = await self._fetch(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY webhook_id")
        return [endpoint(row) for row in rows]

    async def delete_webhook(self, webhook_id: str) -> bool:
        writer = self._writer
        assert writer is not None

        def delete() -> bool:
            writer.execute("BEGIN IMMEDIATE")
            try:
                gone = writer.execute("DELETE FROM webhooks WHERE webhook_id = ?", (webhook_id,))
                writer.execute(
                    "UPDATE webhook_deliveries SET state = 'dead', next_attempt_time = NULL, "
                    "last_error = 'the webhook was deleted' "
                    "WHERE webhook_id = ? AND state = 'pending'",
                    (webhook_id,),
                )
                writer.execute("COMMIT")
            except BaseException:
                writer.execute("ROLLBACK")
                raise
            return bool(gone.rowcount)

        return await self._on_writer_thread(delete)

    async def claim_deliveries(
        self, node: str, limit: int, lease_seconds: float
    ) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
        writer = self._writer
        assert writer is not None
        columns = ", ".join(f"d.{c}" for c in DELIVERY_COLUMNS.split(", "))
        hooks = ", ".join(f"w.{c}" for c in WEBHOOK_COLUMNS.split(", "))

        def claim() -> list[Any]:
            now = datetime.now(UTC)
            writer.execute("BEGIN IMMEDIATE")
            try:
                rows = writer.execute(
                    f"SELECT {columns}, {hooks} FROM webhook_deliveries d "
                    "JOIN webhooks w ON w.webhook_id = d.webhook_id "
                    "WHERE d.state = 'pending' AND d.next_attempt_time <= ? "
                    "AND (d.lease_until IS NULL OR d.lease_until < ?) "
                    "ORDER BY d.next_attempt_time LIMIT ?",
                    (_iso(now), _iso(now), limit),
                ).fetchall()
                writer.executemany(
                    "UPDATE webhook_deliveries SET lease_node = ?, lease_until = ? "
                    "WHERE delivery_id = ?",
                    [(node, _iso(now + timedelta(seconds=lease_seconds)), r[0]) for r in rows],
                )
                writer.execute("COMMIT")
            except BaseException:
                writer.execute("ROLLBACK")
                raise
            return rows

        rows = await self._on_writer_thread(claim)
        split = len(DELIVERY_COLUMNS.split(", "))
        return [(delivery(row[:split]), endpoint(row[split:])) for row in rows]

    async def finish_attempt(
        self,
        delivery_id: str,
        node: str,
        state: DeliveryState,
        status_code: int,
        error: str,
        next_attempt_time: datetime | None,
    ) -> None:
        now = _iso(datetime.now(UTC))
        await self._write_now(
            "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, "
            "last_status_code = ?, last_error = ?, next_attempt_time = ?, "
            "delivered_time = CASE WHEN ? = 'delivered' THEN ? END, "
            "lease_node = NULL, lease_until = NULL "
            "WHERE delivery_id = ? AND lease_node = ? AND state = 'pending'",
            (
                state.value,
                status_code,
                error,
                None if next_attempt_time is None else _iso(next_attempt_time),
                state.value,
                now,
                delivery_id,
                node,
            ),
        )
