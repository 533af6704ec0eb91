"""Calls sent to the node that runs their conversation.

In a cluster any node answers any call: one that does not run the conversation forwards the
call to the node that does, which costs a hop. The service says where a conversation runs
(``owner_address`` on a conversation, the ``x-convsvc-owner`` header of an answer it
forwarded), and a client that remembers it sends the conversation's next calls there
itself. What it remembers may go stale (the conversation moved, its node died): such a call
fails UNAVAILABLE at the old node, and the client forgets the address and sends the call
through its configured address, which forwards it as for any client. That is safe because
every mutation carries a request id fixed before its first attempt.

The async and blocking clients share this bookkeeping; each keeps its own channels.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

OWNER_HEADER = "x-convsvc-owner"
"""Set by a node on an answer it forwarded: the address of the node that answered."""

ROUTED = frozenset(
    {
        "StartConversation",
        "JoinConversation",
        "SendEvent",
        "DisconnectConnection",
        "CloseConversation",
        "GetConversation",
        "CompleteWithAgentLlm",
        "ControlAgent",
        "ConfirmAction",
        "UpdateConversation",
    }
)
"""Calls about one conversation, answered by the node that runs it."""
SENT_AGAIN = ROUTED - {"CompleteWithAgentLlm"}
"""Routed calls that may be sent again after failing at a node: reads, and mutations with
a request id. A completion has none: it may have reached the model, so it is not repeated."""

REMEMBERED = 10_000
"""Conversations (and connections) whose owner a client remembers; the least recently used
are forgotten first (their calls then take the forwarding hop once)."""


Stub = TypeVar("Stub")


@dataclass(frozen=True)
class Node(Generic[Stub]):
    """A channel to one node of a cluster, kept while the client lives."""

    address: str
    channel: Any
    stub: Stub


class Owners:
    """Which node runs each conversation, as the service last said, and which conversation
    each connection joined. Thread-safe: the blocking client may be shared by threads."""

    def __init__(self, limit: int = REMEMBERED) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._owner: OrderedDict[str, str] = OrderedDict()
        self._joined: OrderedDict[str, str] = OrderedDict()
        """connection id -> conversation id, for calls that name only the connection."""

    def conversation_of(self, method: str, request: Any) -> str:
        """The conversation a call is about ("" when it is not routed or not known)."""
        if method not in ROUTED:
            return ""
        if method in ("SendEvent", "DisconnectConnection"):
            cid = str(getattr(request, "conversation_id", ""))
            if cid:
                return cid
            with self._lock:
                return self._joined.get(request.connection_id, "")
        return str(request.conversation_id)

    def owner(self, conversation_id: str) -> str:
        """Where to send the conversation's calls ("": the configured address)."""
        if not conversation_id:
            return ""
        with self._lock:
            address = self._owner.get(conversation_id, "")
            if address:
                self._owner.move_to_end(conversation_id)
            return address

    def remember(self, conversation_id: str, address: str) -> None:
        """Records where the conversation runs ("": nowhere known; forget it)."""
        if not conversation_id:
            return
        with self._lock:
            if not address:
                self._owner.pop(conversation_id, None)
                return
            self._owner[conversation_id] = address
            self._owner.move_to_end(conversation_id)
            while len(self._owner) > self._limit:
                self._owner.popitem(last=False)

    def forget(self, conversation_id: str) -> None:
        self.remember(conversation_id, "")

    def learn(self, method: str, request: Any, response: Any) -> None:
        """What an answer says about where conversations run and what connections joined."""
        if method not in ROUTED:
            return
        if method == "DisconnectConnection":
            with self._lock:
                self._joined.pop(request.connection_id, None)
            return
        if "conversation" in type(response).DESCRIPTOR.fields_by_name:
            conversation = response.conversation
            self.remember(conversation.conversation_id, conversation.owner_address)
        if method == "JoinConversation":
            with self._lock:
                self._joined[response.connection.connection_id] = (
                    response.connection.conversation_id
                )
                self._joined.move_to_end(response.connection.connection_id)
                while len(self._joined) > self._limit:
                    self._joined.popitem(last=False)

    def learn_header(
        self, conversation_id: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> None:
        """The owner a forwarded answer names (answers given by the node called name none)."""
        if not conversation_id:
            return
        for key, value in metadata or ():
            if key == OWNER_HEADER and isinstance(value, str):
                self.remember(conversation_id, value)
                return

    def failed_at_owner(self, method: str, conversation_id: str, error: grpc.RpcError) -> bool:
        """After a call sent to the remembered owner failed: forgets the owner when the
        failure says the node no longer answers for the conversation, and whether to send
        the call again through the configured address."""
        code = error.code()  # type: ignore[attr-defined]
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return False  # the owner answered: that is the answer
        self.forget(conversation_id)
        return code == grpc.StatusCode.UNAVAILABLE and method in SENT_AGAIN
