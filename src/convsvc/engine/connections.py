"""Which connections watch which conversation, and which client instance holds them."""

from __future__ import annotations

from collections import defaultdict

from convsvc.domain import Connection


class ConnectionRegistry:
    """Connections indexed by id, by conversation and by client instance.

    Connections of an instance expire when it has not heart-beaten within the TTL (its web
    server died without disconnecting its browsers).
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_conversation: defaultdict[str, set[str]] = defaultdict(set)
        self._by_instance: defaultdict[str, set[str]] = defaultdict(set)
        self._last_heartbeat: dict[str, float] = {}

    def add(self, connection: Connection, now: float) -> None:
        """Registers a connection, replacing one with the same id."""
        self.remove(connection.connection_id)
        self._by_id[connection.connection_id] = connection
        self._by_conversation[connection.conversation_id].add(connection.connection_id)
        if connection.client_instance_id is not None:
            self._by_instance[connection.client_instance_id].add(connection.connection_id)
            self._last_heartbeat[connection.client_instance_id] = now

    def get(self, connection_id: str) -> Connection | None:
        return self._by_id.get(connection_id)

    def remove(self, connection_id: str) -> Connection | None:
        connection = self._by_id.pop(connection_id, None)
        if connection is None:
            return None
        _discard(self._by_conversation, connection.conversation_id, connection_id)
        if connection.client_instance_id is not None:
            _discard(self._by_instance, connection.client_instance_id, connection_id)
        return connection

    def remove_conversation(self, conversation_id: str) -> list[Connection]:
        """Drops every connection to a conversation (it closed)."""
        return [
            removed
            for connection_id in list(self._by_conversation.get(conversation_id, ()))
            if (removed := self.remove(connection_id)) is not None
        ]

    def ids_for(self, conversation_id: str) -> tuple[str, ...]:
        return tuple(sorted(self._by_conversation.get(conversation_id, ())))

    def count_for_conversation(self, conversation_id: str) -> int:
        return len(self._by_conversation.get(conversation_id, ()))

    def heartbeat(self, client_instance_id: str, now: float) -> int:
        """Records that an instance is alive; returns how many connections it holds."""
        self._last_heartbeat[client_instance_id] = now
        return len(self._by_instance.get(client_instance_id, ()))

    def silent_instances(self, now: float, ttl: float) -> list[str]:
        """Instances that have not heartbeated here for longer than ``ttl``."""
        return [i for i, seen in self._last_heartbeat.items() if now - seen > ttl]

    def expire_instances(self, now: float, ttl: float) -> list[Connection]:
        """Removes the connections of instances silent for longer than ``ttl``."""
        expired: list[Connection] = []
        for instance, seen in list(self._last_heartbeat.items()):
            if now - seen <= ttl:
                continue
            del self._last_heartbeat[instance]
            for connection_id in list(self._by_instance.get(instance, ())):
                removed = self.remove(connection_id)
                if removed is not None:
                    expired.append(removed)
        return expired

    def count(self) -> int:
        return len(self._by_id)

    def all(self) -> list[Connection]:
        return list(self._by_id.values())


def _discard(index: defaultdict[str, set[str]], key: str, value: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(value)
        if not members:
            del index[key]
