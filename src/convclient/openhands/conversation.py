"""What attach_to_conversation hands to OpenHands' conversation routes.

The agent loop and its sandbox live in convsvc, so only the event stream is here; routes that
need the sandbox runtime (files, VS Code, web hosts, runtime config) get a 501 that says why.
"""

from __future__ import annotations

from typing import Any, NoReturn

from fastapi import HTTPException, status

from convclient.openhands.event_store import RemoteEventStore

RUNTIME_UNAVAILABLE = (
    "This OpenHands server runs conversations in convsvc (RemoteConversationManager); "
    "the sandbox runtime (files, VS Code, web hosts, runtime config) is not reachable from "
    "the web server."
)


class RemoteConversation:
    """Duck-types OpenHands' ServerConversation for the routes that attach to one."""

    def __init__(
        self, sid: str, user_id: str | None, event_stream: RemoteEventStore, config: Any
    ) -> None:
        self.sid = sid
        self.user_id = user_id
        self.event_stream = event_stream
        self.config = config

    @property
    def runtime(self) -> NoReturn:
        raise HTTPException(status_code=status.HTTP_501_NOT_IMPLEMENTED, detail=RUNTIME_UNAVAILABLE)

    async def connect(self) -> None:
        """Nothing to connect: the conversation's loop runs in convsvc."""

    async def disconnect(self) -> None:
        """Nothing to release."""
