"""The conversations whose loop runs on this node: by id and by user, changed together, and
how callers see them.

Only the engine adds and removes runtimes (see ``engine``); everything else reads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection

from convsvc.domain import ConversationStatus, ConversationView
from convsvc.engine.connections import ConnectionRegistry
from convsvc.engine.runtime import ConversationRuntime
from convsvc.engine.watch import WatchedConversation


class RuntimeRegistry:
    """Running (starting, running and closing) conversations of this node."""

    def __init__(self, connections: ConnectionRegistry) -> None:
        self._connections = connections
        self._runtimes: dict[str, ConversationRuntime] = {}
        self._by_user: defaultdict[str | None, set[str]] = defaultdict(set)
        """Ids by user: a user's list does not grow with others' conversations."""
        self.address = ""
        """In a cluster, this node's address: where callers reach what runs here."""

    def get(self, conversation_id: str) -> ConversationRuntime | None:
        """The conversation's runtime, closing ones included."""
        return self._runtimes.get(conversation_id)

    def running(self, conversation_id: str) -> ConversationRuntime | None:
        """The conversation's runtime unless it is closing."""
        runtime = self._runtimes.get(conversation_id)
        return runtime if runtime is not None and not runtime.closing else None

    def add(self, runtime: ConversationRuntime) -> None:
        self._runtimes[runtime.conversation_id] = runtime
        self._by_user[runtime.record.user_id].add(runtime.conversation_id)

    def remove(self, runtime: ConversationRuntime) -> bool:
        """Unregisters ``runtime``; False when another run of its id is registered now."""
        cid = runtime.conversation_id
        if self._runtimes.get(cid) is not runtime:
            return False
        del self._runtimes[cid]
        mine = self._by_user[runtime.record.user_id]
        mine.discard(cid)
        if not mine:
            del self._by_user[runtime.record.user_id]
        return True

    def ids_of_user(self, user_id: str | None) -> Collection[str]:
        """The user's conversation ids (closing ones included)."""
        return self._by_user.get(user_id, ())

    def of_user(self, user_id: str | None) -> list[ConversationRuntime]:
        """The user's runtimes that are not closing."""
        return [rt for cid in self.ids_of_user(user_id) if not (rt := self._runtimes[cid]).closing]

    def all(self) -> list[ConversationRuntime]:
        return list(self._runtimes.values())

    def __len__(self) -> int:
        return len(self._runtimes)

    def view(self, runtime: ConversationRuntime) -> ConversationView:
        record = runtime.record
        return ConversationView(
            conversation_id=record.conversation_id,
            user_id=record.user_id,
            agent=record.agent,
            status=runtime.status,
            agent_state=runtime.agent_state,
            latest_event_id=runtime.latest_event_id,
            create_time=record.create_time,
            last_active_time=runtime.last_active_time,
            connection_count=self._connections.count_for_conversation(record.conversation_id),
            owner_address=self.address if runtime.status is not ConversationStatus.STOPPED else "",
            pending_action=runtime.pending_action,
            labels=record.labels,
            title=record.title,
        )

    def watched(self, runtime: ConversationRuntime) -> WatchedConversation:
        cid = runtime.conversation_id
        return WatchedConversation(self.view(runtime), self._connections.ids_for(cid))
