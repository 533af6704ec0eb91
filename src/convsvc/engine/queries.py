"""Reading the live state: conversations (one, or pages of them), connections, the watch's
snapshot and changes, heartbeats, and the gauges metrics read."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from convsvc import validation
from convsvc.config import EngineConfig
from convsvc.domain import (
    Connection,
    ConversationRecord,
    ConversationSearch,
    ConversationStatus,
    ConversationView,
)
from convsvc.engine.admission import Admission
from convsvc.engine.connections import ConnectionRegistry
from convsvc.engine.registry import RuntimeRegistry
from convsvc.engine.subscriptions import Broadcaster
from convsvc.engine.visibility import check_owner, not_found
from convsvc.engine.watch import ChangeFeed, WatchedConversation, WatchUpdate
from convsvc.errors import FailedPrecondition, InvalidArgument
from convsvc.metrics import EngineGauges
from convsvc.paging import decode_token, encode_token
from convsvc.storage import ConversationStore

Candidates = Callable[[str | None, set[str]], Iterator[tuple[str, Any]]]
"""(user, wanted conversation ids) -> (sort key, item) of what a list may return."""


def search_fingerprint(query: ConversationSearch) -> list[Any]:
    """What a search's page token is bound to: its filters, the same on every node."""

    def moment(value: datetime | None) -> str:
        return value.isoformat() if value is not None else ""

    return [
        "search",
        query.user_id,
        sorted(query.conversation_ids),
        query.running,
        sorted(query.agent_states),
        sorted(query.agents),
        sorted(query.labels),
        query.title_contains,
        [moment(query.created_after), moment(query.created_before)],
        [moment(query.active_after), moment(query.active_before)],
        query.limit,
    ]


def stored_view(
    record: ConversationRecord,
    latest_event_id: int,
    status: ConversationStatus = ConversationStatus.STOPPED,
    agent_state: str = "stopped",
) -> ConversationView:
    """A conversation as the store has it: stopped, or run by another node (then with the
    state its owner last stored and no connection count)."""
    return ConversationView(
        conversation_id=record.conversation_id,
        user_id=record.user_id,
        agent=record.agent,
        status=status,
        agent_state=agent_state,
        latest_event_id=latest_event_id,
        create_time=record.create_time,
        last_active_time=record.last_active_time,
        connection_count=0,
        labels=record.labels,
        title=record.title,
    )


def agent_state_filter(agent_states: Sequence[str]) -> frozenset[str]:
    """The agent states a list asks for, checked (OpenHands' state names are identifiers)."""
    return frozenset(validation.check_id("agent_states", state) for state in agent_states)


class ConversationQueries:
    """Answers about what runs here now (and what is stored, for one conversation)."""

    def __init__(
        self,
        config: EngineConfig,
        store: ConversationStore,
        registry: RuntimeRegistry,
        connections: ConnectionRegistry,
        admission: Admission,
        changes: ChangeFeed,
        broadcaster: Broadcaster,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._store = store
        self._registry = registry
        self._connections = connections
        self._admission = admission
        self._changes = changes
        self._broadcaster = broadcaster
        self._clock = clock

    @property
    def default_agent(self) -> str:
        return self._config.default_agent

    def page_size(self, page_size: int) -> int:
        """A request's page size, checked and defaulted."""
        return validation.check_page_size(
            page_size, self._config.default_page_size, self._config.max_page_size
        )

    async def get_conversation(self, conversation_id: str, user_id: str = "") -> ConversationView:
        """A conversation, queued, running or stopped."""
        cid = validation.check_id("conversation_id", conversation_id)
        user = validation.check_user_id(user_id)
        runtime = self._registry.get(cid)
        if runtime is not None:
            check_owner(cid, runtime.record.user_id, user)
            return self._registry.view(runtime)
        if (queued := self._admission.queues.queued(cid)) is not None:
            check_owner(cid, queued.user_id, user)
            return self._admission.queued_view(queued)
        record = await self._store.get_conversation(cid)
        if record is None:
            raise not_found(cid)
        check_owner(cid, record.user_id, user)
        return stored_view(record, await self._store.latest_event_id(cid))

    async def search_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        statuses: Iterable[ConversationStatus] = (),
        agent_states: Sequence[str] = (),
        agents: Sequence[str] = (),
        labels: dict[str, str] | None = None,
        title_contains: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        active_after: datetime | None = None,
        active_before: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[ConversationView], str]:
        """Every stored conversation that matches all filters given, newest activity first,
        one page at a time. Those running on this node show their live state; others what
        their owner last stored."""
        wanted = set(statuses)
        if ConversationStatus.QUEUED in wanted:
            raise InvalidArgument(
                "a queued start is not stored until it runs: find queued ones with "
                "ListConversations or WatchConversations",
                reason="INVALID_ARGUMENT",
                metadata={"field": "statuses"},
            )
        want_running = bool(wanted & {ConversationStatus.STARTING, ConversationStatus.RUNNING})
        want_stopped = ConversationStatus.STOPPED in wanted
        running = want_running if want_running != want_stopped else None
        query = ConversationSearch(
            user_id=validation.check_user_id(user_id),
            conversation_ids=frozenset(
                validation.check_id("conversation_ids", c) for c in conversation_ids
            ),
            running=running,
            agent_states=agent_state_filter(agent_states),
            agents=frozenset(validation.check_id("agents", a) for a in agents),
            labels=tuple(sorted(validation.check_labels(labels or {}).items())),
            title_contains=validation.check_title(title_contains, "title_contains"),
            created_after=created_after,
            created_before=created_before,
            active_after=active_after,
            active_before=active_before,
            limit=self.page_size(page_size),
        )
        return await self._search(query, page_token)

    async def _search(
        self, query: ConversationSearch, page_token: str
    ) -> tuple[list[ConversationView], str]:
        key = self._store.page_token_key
        fingerprint = search_fingerprint(query)
        if page_token:
            moment, _, cid = decode_token(key, page_token, fingerprint, str).partition("|")
            query = dataclasses.replace(query, after=(datetime.fromisoformat(moment), cid))
        found = await self._store.search_conversations(
            dataclasses.replace(query, limit=query.limit + 1)
        )
        page = found[: query.limit]
        views = []
        for stored in page:
            runtime = self._registry.get(stored.record.conversation_id)
            if runtime is not None and not runtime.closing:
                views.append(self._registry.view(runtime))
            elif stored.record.running:
                views.append(
                    stored_view(
                        stored.record,
                        stored.latest_event_id,
                        ConversationStatus.RUNNING,
                        stored.agent_state,
                    )
                )
            else:
                views.append(stored_view(stored.record, stored.latest_event_id))
        token = ""
        if len(found) > query.limit:
            last = page[-1].record
            token = encode_token(
                key, fingerprint, f"{last.last_active_time.isoformat()}|{last.conversation_id}"
            )
        return views, token

    def list_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
        agent_states: Sequence[str] = (),
    ) -> tuple[list[ConversationView], str]:
        """Running (and starting) conversations, by id, one page at a time; only those whose
        agent is in one of ``agent_states`` when given."""
        states = agent_state_filter(agent_states)

        def candidates(user: str | None, wanted: set[str]) -> Iterator[tuple[str, Any]]:
            if wanted:
                ids: Iterable[str] = wanted
            elif user is not None:
                ids = self._registry.ids_of_user(user)
            else:
                ids = [runtime.conversation_id for runtime in self._registry.all()]
            for cid in ids:
                runtime = self._registry.running(cid)
                if (
                    runtime is not None
                    and (user is None or runtime.record.user_id == user)
                    and (not states or runtime.agent_state in states)
                ):
                    yield cid, runtime

        runtimes, token = self._page(
            "conversations",
            user_id,
            conversation_ids,
            page_size,
            page_token,
            candidates,
            sorted(states),
        )
        return [self._registry.view(runtime) for runtime in runtimes], token

    def list_connections(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Connection], str]:
        """Connections, by id, one page at a time."""

        def candidates(user: str | None, wanted: set[str]) -> Iterator[tuple[str, Any]]:
            for connection in self._connections.all():
                if (user is None or connection.user_id == user) and (
                    not wanted or connection.conversation_id in wanted
                ):
                    yield connection.connection_id, connection

        connections, token = self._page(
            "connections", user_id, conversation_ids, page_size, page_token, candidates
        )
        if user_id:
            # Which web process holds a connection is the service's business, not a user's:
            # an instance id is what keeps that process's connections alive.
            connections = [dataclasses.replace(c, client_instance_id=None) for c in connections]
        return connections, token

    def _page(
        self,
        kind: str,
        user_id: str,
        conversation_ids: Sequence[str],
        page_size: int,
        page_token: str,
        candidates: Candidates,
        filters: list[str] | None = None,
    ) -> tuple[list[Any], str]:
        """One page of (key, item) candidates ordered by key; the token holds the last key
        (and is good only for the same query)."""
        user = validation.check_user_id(user_id)
        wanted = {validation.check_id("conversation_ids", c) for c in conversation_ids}
        size = self.page_size(page_size)
        query = [kind, user, sorted(wanted)]
        if filters:
            query.append(filters)
        key = self._store.page_token_key
        after = decode_token(key, page_token, query, str) if page_token else ""
        matching = sorted(
            (item for item in candidates(user, wanted) if item[0] > after), key=lambda i: i[0]
        )
        page = matching[:size]
        token = encode_token(key, query, page[-1][0]) if len(matching) > size else ""
        return [item for _, item in page], token

    async def watch_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Sequence[str] = (),
        resume_token: str = "",
        resume_only: bool = False,
    ) -> AsyncIterator[WatchUpdate]:
        """A snapshot of the matching queued, starting and running conversations (or, with
        a token this feed can resume from, none), then every matching change.
        ``resume_only``: a token that cannot be resumed fails (RESUME_TOKEN_EXPIRED) instead
        of getting a snapshot (a cluster watch then asks every node for one)."""
        user = validation.check_user_id(user_id)
        wanted = {validation.check_id("conversation_ids", c) for c in conversation_ids}
        self._changes.check_open()

        def matches(watched: WatchedConversation) -> bool:
            view = watched.view
            return (user is None or view.user_id == user) and (
                not wanted or view.conversation_id in wanted
            )

        seq = self._changes.resumable_seq(resume_token) if resume_token else None
        resumed = seq is not None
        if seq is None and resume_only:
            raise FailedPrecondition(
                "this node can no longer resume from the token", reason="RESUME_TOKEN_EXPIRED"
            )
        if seq is None:
            # Taken in one step with the feed's position: no change falls between them.
            seq = self._changes.last_seq
            snapshot = [
                watched
                for runtime in self._registry.all()
                if not runtime.closing and matches(watched := self._registry.watched(runtime))
            ]
            snapshot += [
                watched
                for entry in self._admission.queues.all_queued()
                if matches(watched := WatchedConversation(self._admission.queued_view(entry), ()))
            ]
            snapshot.sort(key=lambda w: w.view.conversation_id)
            yield WatchUpdate(snapshot, (), self._changes.token(seq))
        updates = self._changes.changes_after(seq, matches, resumed=resumed, user=user)
        async for update in updates:
            yield update

    def heartbeat(self, client_instance_id: str) -> tuple[int, float]:
        """Keeps an instance's connections alive; returns (connections, ttl seconds)."""
        instance = validation.check_id("client_instance_id", client_instance_id)
        count = self._connections.heartbeat(instance, self._clock())
        return count, self._config.connection_ttl_seconds

    def runs_here(self, conversation_id: str) -> bool:
        """Whether this node runs the conversation's loop (and so publishes its events)."""
        return self._registry.running(conversation_id) is not None

    async def while_here(self, conversation_id: str) -> int | None:
        """Waits while this node runs the conversation's loop (it publishes the events
        itself meanwhile); returns the newest id it committed, or None when it does not run
        here."""
        runtime = self._registry.get(conversation_id)
        if runtime is None:
            return None
        await runtime.closed.wait()
        return runtime.latest_event_id

    def local_connection(self, connection_id: str) -> Connection | None:
        """A connection held on this node."""
        return self._connections.get(connection_id)

    def gauges(self) -> EngineGauges:
        """What the node holds now, for metrics (read at scrape time, in one step)."""
        by_status: defaultdict[str, int] = defaultdict(int)
        by_state: defaultdict[str, int] = defaultdict(int)
        for runtime in self._registry.all():
            by_status[runtime.phase.value] += 1
            by_state[runtime.agent_state] += 1
        subscribers, lag = self._broadcaster.backlog()
        return EngineGauges(
            dict(by_status),
            dict(by_state),
            self._connections.count(),
            subscribers,
            lag,
            self._changes.watchers,
            len(self._admission.queues.all_queued()),
        )
