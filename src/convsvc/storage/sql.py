"""The reads both SQL backends share, written once.

Queries use numbered parameters (``$1``, ``$2``...): PostgreSQL's own form, and SQLite's once
each ``$`` becomes ``?``. Rows come back as the domain types whatever the backend returns
(SQLite keeps times as ISO text, PostgreSQL as timestamps).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from convsvc.domain import (
    AuditEntry,
    AuditQuery,
    ConversationRecord,
    ConversationSearch,
    DeliveryQuery,
    IdempotencyRecord,
    StoredConversation,
    StoredEvent,
    WebhookDelivery,
)
from convsvc.storage.base import EventPage, plan_page
from convsvc.storage.outbox import DELIVERY_COLUMNS, delivery

MAX_EVENT_ID = 2**63 - 1
"""The end of an open range of event ids."""

CONVERSATION_COLUMNS = (
    "conversation_id, user_id, agent, settings, create_time, last_active_time, labels, title, "
    "running"
)
AUDIT_COLUMNS = (
    "sequence, time, credential, subject, token_id, method, user_id, conversation_id, "
    "connection_id, request_id, code, reason, affected_token_id"
)
_NUMBERED = re.compile(r"\$(\d+)")


def question_marks(sql: str) -> str:
    """A query's numbered parameters as SQLite writes them (``$1`` -> ``?1``)."""
    return _NUMBERED.sub(r"?\1", sql)


def _time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def conversation_record(row: Sequence[Any]) -> ConversationRecord:
    """A conversation row (CONVERSATION_COLUMNS, in order) as a record."""
    cid, user_id, agent, settings, create_time, last_active_time, labels, title, running = row
    return ConversationRecord(
        conversation_id=cid,
        user_id=user_id,
        agent=agent,
        settings=json.loads(settings),
        create_time=_time(create_time),
        last_active_time=_time(last_active_time),
        labels=json.loads(labels) if isinstance(labels, str) else dict(labels or {}),
        title=title,
        running=bool(running),
    )


class SqlReads(ABC):
    """Reads of conversations, events, request ids, the audit log and revocations."""

    octet_length = "octet_length"
    """The SQL function giving a blob's size without reading it."""

    @abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        """Runs a query with numbered parameters and returns its rows."""

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        rows = await self._fetch(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE conversation_id = $1",
            conversation_id,
        )
        return conversation_record(rows[0]) if rows else None

    async def latest_event_id(self, conversation_id: str) -> int:
        rows = await self._fetch(
            "SELECT max(id) FROM events WHERE conversation_id = $1", conversation_id
        )
        latest = rows[0][0] if rows else None
        return -1 if latest is None else int(latest)

    async def read_events(
        self,
        conversation_id: str,
        start_id: int,
        end_id: int | None = None,
        *,
        reverse: bool = False,
        limit: int = 100,
    ) -> list[StoredEvent]:
        rows = await self._fetch(
            "SELECT id, encoded FROM events WHERE conversation_id = $1 AND id >= $2 AND id <= $3 "
            f"ORDER BY id {'DESC' if reverse else 'ASC'} LIMIT $4",
            conversation_id,
            start_id,
            MAX_EVENT_ID if end_id is None else end_id,
            limit,
        )
        return list(map(StoredEvent._make, rows))

    async def read_page(
        self,
        conversation_id: str,
        start_id: int,
        end_id: int | None = None,
        *,
        reverse: bool = False,
        limit: int,
        max_bytes: int,
    ) -> EventPage:
        order = "DESC" if reverse else "ASC"
        # The sizes first (a blob's size is in its header): events left out of the page are
        # never loaded.
        sizes = await self._fetch(
            f"SELECT id, {self.octet_length}(encoded) FROM events "
            "WHERE conversation_id = $1 AND id >= $2 AND id <= $3 "
            f"ORDER BY id {order} LIMIT $4",
            conversation_id,
            start_id,
            MAX_EVENT_ID if end_id is None else end_id,
            limit + 1,
        )
        span, next_id = plan_page(sizes, limit, max_bytes, reverse)
        if span is None:
            return EventPage([], next_id)
        rows = await self._fetch(
            "SELECT id, encoded FROM events WHERE conversation_id = $1 AND id >= $2 AND id <= $3 "
            f"ORDER BY id {order}",
            conversation_id,
            *span,
        )
        return EventPage(list(map(StoredEvent._make, rows)), next_id)

    async def get_idempotency(self, scope: str, request_id: str) -> IdempotencyRecord | None:
        rows = await self._fetch(
            "SELECT method, fingerprint, result FROM requests WHERE scope = $1 AND request_id = $2",
            scope,
            request_id,
        )
        if not rows:
            return None
        method, fingerprint, result = rows[0]
        return IdempotencyRecord(scope, request_id, method, fingerprint, json.loads(result))

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        rows = await self._fetch(
            f"SELECT {AUDIT_COLUMNS} FROM audit WHERE sequence > $1 "
            "AND ($2 = '' OR conversation_id = $2) AND ($3 = '' OR user_id = $3 OR subject = $3) "
            "ORDER BY sequence LIMIT $4",
            query.after,
            query.conversation_id,
            query.user_id,
            query.limit,
        )
        return [
            AuditEntry(
                sequence=row[0],
                time=_time(row[1]),
                credential=row[2],
                subject=row[3],
                token_id=row[4],
                method=row[5],
                user_id=row[6],
                conversation_id=row[7],
                connection_id=row[8],
                request_id=row[9],
                code=row[10],
                reason=row[11],
                affected_token_id=row[12],
            )
            for row in rows
        ]

    async def token_revoked(self, token_id: str) -> bool:
        rows = await self._fetch("SELECT 1 FROM revoked_tokens WHERE token_id = $1", token_id)
        return bool(rows)

    label_table = False
    """Whether the store keeps labels in a table of their own, indexed for searches."""

    find_text = "instr"
    """The SQL function (haystack, needle) giving a substring's position, 0 when absent."""

    @abstractmethod
    def _labels_match(self, labels: tuple[tuple[str, str], ...], arg: Callable[[Any], str]) -> str:
        """The condition that a row has every label (``arg`` adds an argument and names
        its parameter)."""

    async def search_conversations(self, query: ConversationSearch) -> list[StoredConversation]:
        """Stored conversations that match, by last activity (newest first), then id."""
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        # What the page is read through, in order of activity: a label's own index when the
        # store keeps one (unless one user's few conversations are read anyway).
        source, order, labels = "conversations c", "c", query.labels
        if labels and self.label_table and query.user_id is None:
            (key, value), labels = labels[0], labels[1:]
            source = (
                "conversation_labels l JOIN conversations c "
                "ON c.conversation_id = l.conversation_id"
            )
            order = "l"
            where += [f"l.key = {arg(key)}", f"l.value = {arg(value)}"]
        if query.user_id is not None:
            where.append(f"c.user_id = {arg(query.user_id)}")
        for column, values in (
            ("c.conversation_id", query.conversation_ids),
            ("c.agent_state", query.agent_states),
            ("c.agent", query.agents),
        ):
            if values:
                where.append(f"{column} IN ({', '.join(arg(v) for v in sorted(values))})")
        if query.running is not None:
            where.append("c.running" if query.running else "NOT c.running")
        if labels:
            where.append(self._labels_match(labels, arg))
        if query.title_contains:
            where.append(
                f"{self.find_text}(lower(c.title), lower({arg(query.title_contains)})) > 0"
            )
        for column, operator, bound in (
            ("c.create_time", ">=", query.created_after),
            ("c.create_time", "<", query.created_before),
            ("c.last_active_time", ">=", query.active_after),
            ("c.last_active_time", "<", query.active_before),
        ):
            if bound is not None:
                where.append(f"{column} {operator} {arg(self._time_arg(bound))}")
        if query.after is not None:
            moment, cid = query.after
            where.append(
                f"({order}.last_active_time, {order}.conversation_id) < "
                f"({arg(self._time_arg(moment))}, {arg(cid)})"
            )
        columns = ", ".join(f"c.{column}" for column in CONVERSATION_COLUMNS.split(", "))
        rows = await self._fetch(
            f"SELECT {columns}, c.agent_state, "
            "(SELECT max(e.id) FROM events e WHERE e.conversation_id = c.conversation_id) "
            f"FROM {source} {'WHERE ' + ' AND '.join(where) if where else ''} "
            f"ORDER BY {order}.last_active_time DESC, {order}.conversation_id DESC "
            f"LIMIT {arg(query.limit)}",
            *args,
        )
        return [
            StoredConversation(
                conversation_record(row[:9]), row[9], -1 if row[10] is None else int(row[10])
            )
            for row in rows
        ]

    def _time_arg(self, moment: datetime) -> Any:
        """A time as the backend compares it (SQLite keeps ISO text)."""
        return moment

    async def list_deliveries(self, query: DeliveryQuery) -> list[WebhookDelivery]:
        """Webhook deliveries that match, newest first (see ``outbox``)."""
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.webhook_id:
            where.append(f"webhook_id = {arg(query.webhook_id)}")
        if query.conversation_id:
            where.append(f"conversation_id = {arg(query.conversation_id)}")
        if query.states:
            states = ", ".join(arg(state.value) for state in sorted(query.states))
            where.append(f"state IN ({states})")
        if query.after is not None:
            moment, last = query.after
            where.append(
                f"(create_time, delivery_id) < ({arg(self._time_arg(moment))}, {arg(last)})"
            )
        rows = await self._fetch(
            f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} "
            f"ORDER BY create_time DESC, delivery_id DESC LIMIT {arg(query.limit)}",
            *args,
        )
        return [delivery(tuple(row)) for row in rows]


def page_filters(
    key: str, after: str, limit: int, user_id: str | None, wanted: Sequence[str]
) -> tuple[list[str], list[Any]]:
    """WHERE clauses and arguments of a page ordered by ``key`` ($1: after, $2: limit),
    of one user's rows and of the wanted conversations, when given (PostgreSQL)."""
    table = key.split(".", 1)[0] + "." if "." in key else ""
    where = [f"{key} > $1"]
    args: list[Any] = [after, limit]
    if user_id is not None:
        args.append(user_id)
        where.append(f"{table}user_id = ${len(args)}")
    if wanted:
        args.append(list(wanted))
        where.append(f"{table}conversation_id = ANY(${len(args)}::text[])")
    return where, args
