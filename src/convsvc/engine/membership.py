"""What the engine asks of the cluster it belongs to (``convsvc.cluster`` implements it).

A node on its own (SQLite) has no membership: every conversation is its own, and the
per-user limit is kept among its own loops. In a cluster the lease decides who runs a
conversation, and the limit is kept across every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from convsvc.domain import Connection, ConversationRecord


class Membership(Protocol):
    address: str
    """host:port where other nodes and clients reach this node."""

    async def claim(
        self, record: ConversationRecord, *, take_over: bool, may_stop: frozenset[str] | None
    ) -> None:
        """Makes this node the conversation's owner before its loop starts here.

        Stops the user's oldest running conversations first when the user is at the limit,
        wherever they run, if ``may_stop`` (None: any) covers them (else PERMISSION_DENIED).
        Raises Unavailable (OWNER_MOVED) when a live node owns it.
        """

    async def release(self, conversation_id: str, *, keep_running: bool) -> None:
        """Gives up the lease once this node's loop ended (``keep_running``: hand it over)."""

    def lost(self, conversation_id: str, *, readopt: bool) -> None:
        """This node's loop was dropped without a release (fenced off, or its log became
        uncertain; ``readopt``: claim it again once the database answers)."""

    async def find_connection(self, connection_id: str) -> Connection | None:
        """A connection held on any node."""

    async def connection_added(self, connection: Connection) -> None:
        """Publishes a connection so any node can find its conversation."""

    async def connections_removed(self, connection_ids: Sequence[str]) -> None:
        """Withdraws connections from the directory."""

    async def instances_alive(self, instance_ids: Sequence[str], within: float) -> set[str]:
        """Which of these client instances heartbeated any node in the last ``within`` s."""
