"""``/sockets/events/{conversation_id}``: a conversation's events over a WebSocket, as the
stock agent-server sends them.

On connect (after auth: the key in the query or header, else a first ``auth`` frame), the
client gets the conversation's full state, then the events ``resend_mode`` asks for (``all``,
or ``since`` with ``after_timestamp``), then every new event and state update. The events
come from one convsvc event stream (stored, then live, gap-free), so each is sent once and
in log order, reconnects included. State updates come from the worker as transient status
updates; one is held back until the events logged before it were sent, so a client that
sees a run end has its events. Frames the client sends are messages to the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import datetime
from typing import Any

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from convsvc.agent_server import records
from convsvc.agent_server.conversations import Conversations
from convsvc.web.loopback import ApiError

log = structlog.get_logger(__name__)

AUTH_TIMEOUT_SECONDS = 10.0
_AUTH_FAILED = (4001, "Authentication failed")
_NOT_FOUND = (4004, "Conversation not found")


def state_frame(key: str, value: Any) -> dict[str, Any]:
    """A ConversationStateUpdateEvent as the SDK serialises it."""
    return {
        "kind": "ConversationStateUpdateEvent",
        "id": str(uuid.uuid4()),
        "timestamp": datetime.now().isoformat(),
        "source": "environment",
        "key": key,
        "value": value,
    }


class EventSocket:
    """One client's socket."""

    def __init__(self, conversations: Conversations, auth_required: bool) -> None:
        self._conversations = conversations
        self._auth_required = auth_required

    async def handle(self, websocket: WebSocket) -> None:
        key = await self._authenticate(websocket)
        if key is False:
            return
        session_key = key if isinstance(key, str) else None
        try:
            cid = str(uuid.UUID(websocket.path_params["conversation_id"]))
            conversation = await self._conversations.get(session_key, cid)
            info = await self._conversations.info(session_key, conversation)
        except (ValueError, ApiError) as error:
            code = (
                _AUTH_FAILED if isinstance(error, ApiError) and error.status == 401 else _NOT_FOUND
            )
            await _close(websocket, *code)
            return
        params = websocket.query_params
        mode = params.get("resend_mode") or ("all" if params.get("resend_all") == "true" else None)
        since: str | None = None
        if mode == "since":
            raw = params.get("after_timestamp")
            try:
                since = records.server_time(datetime.fromisoformat(raw)) if raw else None
            except ValueError:
                since = None
            if since is None:
                mode = None  # stock resends nothing without a valid timestamp
        start_id = 0 if mode in ("all", "since") else conversation.latest_event_id + 1
        await websocket.send_json(state_frame("full_state", info))
        relay = asyncio.create_task(
            self._relay(websocket, session_key, cid, start_id, since), name=f"ws-relay-{cid}"
        )
        try:
            await self._receive(websocket, session_key, cid, relay)
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await relay

    async def _authenticate(self, websocket: WebSocket) -> str | bool:
        """The session key (True when none is needed), or False once the socket is closed."""
        given = websocket.query_params.get("session_api_key") or websocket.headers.get(
            "x-session-api-key"
        )
        if given is not None:
            await websocket.accept()
            return given
        await websocket.accept()
        if not self._auth_required:
            return True
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_SECONDS)
            frame = json.loads(raw)
        except (TimeoutError, json.JSONDecodeError, WebSocketDisconnect, KeyError):
            await _close(websocket, *_AUTH_FAILED)
            return False
        if (
            not isinstance(frame, dict)
            or frame.get("type") != "auth"
            or not isinstance(frame.get("session_api_key"), str)
            or not frame["session_api_key"]
        ):
            await _close(websocket, *_AUTH_FAILED)
            return False
        return str(frame["session_api_key"])

    async def _relay(
        self, websocket: WebSocket, key: str | None, cid: str, start_id: int, since: str | None
    ) -> None:
        sent_through = start_id - 1
        held: list[tuple[int, dict[str, Any]]] = []
        try:
            async for batch in self._conversations.stream(key, cid, start_id):
                for event in batch.events:
                    sdk = records.sdk_event(event.payload)
                    if sdk is not None and (since is None or str(sdk.get("timestamp")) >= since):
                        await websocket.send_json(sdk)
                    sent_through = event.id
                status = batch.status_update or {}
                frame = status.get("agent_server_frame")
                if isinstance(frame, dict):
                    held.append((int(status.get("after_event_id", -1)), frame))
                while held and held[0][0] <= sent_through:
                    await websocket.send_json(held.pop(0)[1])
        except ApiError as error:
            log.info("agent_server.socket_stream_ended", conversation_id=cid, reason=error.detail)
            await _close(websocket, 1011, error.detail[:120])

    async def _receive(
        self, websocket: WebSocket, key: str | None, cid: str, relay: asyncio.Task[None]
    ) -> None:
        while not relay.done():
            try:
                data = await websocket.receive_json()
            except WebSocketDisconnect:
                return
            except (json.JSONDecodeError, KeyError, RuntimeError):
                return
            if isinstance(data, dict) and data.get("type") == "auth":
                continue  # a redundant auth frame
            try:
                if not isinstance(data, dict):
                    raise ApiError(422, "a message frame must be a JSON object")
                await self._conversations.send_message(key, cid, {**data, "run": True})
            except ApiError as error:
                await websocket.send_json(
                    {
                        "kind": "ServerErrorEvent",
                        "id": str(uuid.uuid4()),
                        "timestamp": datetime.now().isoformat(),
                        "source": "environment",
                        "code": error.reason or str(error.status),
                        "detail": error.detail,
                    }
                )


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code=code, reason=reason)
