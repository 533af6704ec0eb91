"""The agent-server API's operations, each a few convsvc calls: what a stock agent-server
does with its files, done with convsvc's log, limits and workers.

A conversation of this API is a convsvc conversation of the ``openhands-sdk`` agent kind,
labelled ``agent-server``; its id is the SDK's UUID. Its SDK events, state snapshots and
control requests are events of its log (see ``records``). Conversations stopped by convsvc
(idle cleanup, a restart) are resumed on a worker when a call needs them running.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import field_mask_pb2

from convclient import convert
from convclient.models import Conversation, ConversationStatus
from convclient.structs import dict_to_struct
from convsvc.agent_server import records
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.web.loopback import ApiError, Backend

JsonObject = dict[str, Any]

_CONTROL = {"pause": pb.AGENT_CONTROL_PAUSE, "interrupt": pb.AGENT_CONTROL_INTERRUPT}


def cipher_key(secret: str) -> str:
    """The key the SDK's cipher encrypts a conversation's secrets with in the snapshots
    convsvc stores: derived from the operator's secret (by default the service token), so
    the key itself is never stored and a restarted convsvc derives it again."""
    digest = hashlib.sha256(b"convsvc agent-server cipher\0" + secret.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()


def parse_id(value: str) -> str:
    """A conversation id as the stock server accepts it (any UUID form), dashed."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(422, f"{value[:60]!r} is not a valid UUID") from None


class Conversations:
    """The API's conversation operations over convsvc."""

    def __init__(self, backend: Backend, secret: str | None, start_timeout_seconds: float) -> None:
        self._backend = backend
        self._cipher_key = cipher_key(secret) if secret else ""
        self._start_timeout = start_timeout_seconds

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str | None, conversation_id: str) -> Conversation:
        """The convsvc conversation behind an API conversation; 404 when there is none (or
        it was deleted, or belongs to another API)."""
        try:
            conversation = await self._backend.conversation(conversation_id, key)
        except ApiError as error:
            if error.status == 404:
                raise ApiError(404, "Not Found") from None
            raise
        if conversation.labels.get(records.LABEL) != records.ACTIVE:
            raise ApiError(404, "Not Found")
        return conversation

    async def info(self, key: str | None, conversation: Conversation) -> JsonObject:
        """The conversation's ConversationInfo: the worker's latest snapshot, with the
        execution status convsvc knows now."""
        payloads = (
            event.payload
            async for event in self._backend.events(conversation.conversation_id, key, reverse=True)
        )
        found: JsonObject | None = None
        async for payload in payloads:
            found = records.snapshot(payload)
            if found is not None:
                break
        if found is None or not isinstance(found.get("info"), dict):
            raise ApiError(
                503,
                f"conversation {conversation.conversation_id} has not been set up by an "
                "openhands-sdk worker yet",
            )
        info = dict(found["info"])
        if conversation.status is ConversationStatus.RUNNING and conversation.agent_state:
            info["execution_status"] = records.execution_status(conversation.agent_state)
        return info

    async def search(
        self, key: str | None, *, page_id: str | None, limit: int, status: str | None
    ) -> JsonObject:
        """A page of conversations, newest first. A status filter applies to the status
        each conversation shows now (its info), as stock's does, so a page may hold fewer
        than ``limit`` while more follow."""
        response = await self._backend.call(
            "SearchConversations",
            pb.SearchConversationsRequest(
                agents=[records.AGENT_KIND],
                labels={records.LABEL: records.ACTIVE},
                page_size=limit,
                page_token=page_id or "",
            ),
            key,
        )
        found = [convert.conversation(c) for c in response.conversations]
        infos = await asyncio.gather(*(self._info_or_none(key, c) for c in found))
        return {
            "items": [
                info
                for info in infos
                if info is not None and (status is None or info.get("execution_status") == status)
            ],
            "next_page_id": response.next_page_token or None,
        }

    async def _info_or_none(self, key: str | None, conversation: Conversation) -> JsonObject | None:
        try:
            return await self.info(key, conversation)
        except ApiError as error:
            if error.status in (404, 503):
                return None  # deleted meanwhile, or not set up yet
            raise

    async def count(self, key: str | None, status: str | None) -> int:
        total, page = 0, None
        while True:
            result = await self.search(key, page_id=page, limit=100, status=status)
            total += len(result["items"])
            page = result["next_page_id"]
            if not page:
                return total

    async def sdk_events(self, key: str | None, conversation_id: str) -> list[JsonObject]:
        """Every SDK event of the conversation, in log order."""
        events: list[JsonObject] = []
        async for event in self._backend.events(conversation_id, key):
            sdk = records.sdk_event(event.payload)
            if sdk is not None:
                events.append(sdk)
        return events

    # -- writes ------------------------------------------------------------------------------

    async def create(self, key: str | None, body: JsonObject) -> tuple[JsonObject, bool]:
        """Starts a conversation (or answers the existing one with that id, as stock does);
        returns its info and whether it is new."""
        if not any(body.get(k) for k in ("agent", "agent_settings")):
            raise ApiError(422, "the request needs an agent (or agent_settings)")
        given = body.get("conversation_id")
        cid = parse_id(str(given)) if given else str(uuid.uuid4())
        if given:
            try:
                existing = await self._backend.conversation(cid, key)
            except ApiError as error:
                if error.status != 404:
                    raise
            else:
                if existing.labels.get(records.LABEL) != records.ACTIVE:
                    # A deleted conversation's log is kept: its id is not free again.
                    raise ApiError(
                        409,
                        f"conversation {cid} was deleted or is not an agent-server "
                        "conversation; create with another id",
                        "CONVERSATION_EXISTS",
                    )
                return await self.info(key, existing), False
        initial = body.get("initial_message")
        request = {k: v for k, v in body.items() if k != "initial_message"}
        start = pb.StartConversationRequest(
            conversation_id=cid,
            user_id=str(body.get("user_id") or ""),
            agent=records.AGENT_KIND,
            settings=dict_to_struct(self._settings(request)),
            labels={records.LABEL: records.ACTIVE},
            request_id=f"agent-server-create-{cid}",
        )
        if isinstance(initial, dict):
            # Stock logs the initial message and runs, whatever its ``run`` says.
            start.initial_user_message.CopyFrom(
                dict_to_struct(_message_event({**initial, "run": True}))
            )
        await self._backend.call("StartConversation", start, key)
        await self._wait_for_snapshot(key, cid)
        return await self.info(key, await self.get(key, cid)), True

    def _settings(self, request: JsonObject | None) -> JsonObject:
        """What the worker gets in memory (never stored: not on convsvc's settings
        allow-list): the client's request with its secrets, and the cipher key."""
        settings: JsonObject = {"secret_key": self._cipher_key}
        if request is not None:
            settings["request"] = request
        return settings

    async def _wait_for_snapshot(self, key: str | None, cid: str) -> None:
        """Waits until a worker has set the conversation up (its first snapshot is logged)."""

        async def first_snapshot() -> None:
            async for batch in self._backend.stream(cid, key, 0):
                if any(records.snapshot(e.payload) for e in batch.events):
                    return

        try:
            await asyncio.wait_for(first_snapshot(), self._start_timeout)
        except TimeoutError:
            raise ApiError(
                503,
                f"no openhands-sdk worker set conversation {cid} up within "
                f"{self._start_timeout:g} s: is a worker of that kind attached?",
                "NO_AGENT_WORKER",
            ) from None

    async def running(self, key: str | None, conversation_id: str) -> Conversation:
        """The conversation, resumed on a worker first when convsvc stopped it."""
        conversation = await self.get(key, conversation_id)
        if conversation.status is not ConversationStatus.STOPPED:
            return conversation
        await self._backend.call(
            "StartConversation",
            pb.StartConversationRequest(
                conversation_id=conversation_id,
                user_id=conversation.user_id,
                agent=records.AGENT_KIND,
                settings=dict_to_struct(self._settings(None)),
            ),
            key,
        )
        return await self.get(key, conversation_id)

    async def send_message(self, key: str | None, conversation_id: str, body: JsonObject) -> None:
        await self.running(key, conversation_id)
        await self._send(key, conversation_id, _message_event(body))

    async def run(self, key: str | None, conversation_id: str) -> None:
        conversation = await self.running(key, conversation_id)
        if conversation.agent_state == "running":
            raise ApiError(409, "Conversation already running. Wait for completion or pause first.")
        await self._send(
            key,
            conversation_id,
            {"action": "change_agent_state", "args": {"agent_state": "running", "thought": ""}},
        )

    async def control(self, key: str | None, conversation_id: str, what: str) -> None:
        """Pause (the current step ends first) or interrupt (it is cancelled) through
        convsvc's run control, which waits for the agent to answer."""
        conversation = await self.get(key, conversation_id)
        if conversation.status is ConversationStatus.STOPPED:
            return  # nothing runs: nothing to pause or interrupt
        await self._backend.call(
            "ControlAgent",
            pb.ControlAgentRequest(conversation_id=conversation_id, control=_CONTROL[what]),
            key,
        )

    async def confirm(self, key: str | None, conversation_id: str, body: JsonObject) -> None:
        await self.running(key, conversation_id)
        await self._send(
            key,
            conversation_id,
            {
                "action": "agent_server_confirmation",
                "args": {"accept": bool(body.get("accept")), "reason": str(body.get("reason", ""))},
            },
        )

    async def delete(self, key: str | None, conversation_id: str) -> None:
        """Hides the conversation from the API (404 from now on) and stops it; its log stays,
        as convsvc keeps every acknowledged event (and the audit log records the delete)."""
        await self.get(key, conversation_id)
        await self._backend.call(
            "UpdateConversation",
            pb.UpdateConversationRequest(
                conversation_id=conversation_id,
                labels={records.LABEL: records.DELETED},
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            ),
            key,
        )
        try:
            await self._backend.call(
                "CloseConversation",
                pb.CloseConversationRequest(conversation_id=conversation_id),
                key,
            )
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    async def _send(self, key: str | None, conversation_id: str, event: JsonObject) -> None:
        await self._backend.call(
            "SendEvent",
            pb.SendEventRequest(conversation_id=conversation_id, event=dict_to_struct(event)),
            key,
        )

    def stream(self, key: str | None, conversation_id: str, start_id: int) -> AsyncIterator[Any]:
        return self._backend.stream(conversation_id, key, start_id)


def _message_event(body: JsonObject) -> JsonObject:
    """A SendMessageRequest (role, content, run) as the user event convsvc logs and the
    worker turns into the SDK's message."""
    role = body.get("role", "user")
    content = body.get("content", [])
    if not isinstance(content, list):
        raise ApiError(422, "content must be a list of content parts")
    text = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return {
        "action": "message",
        "args": {"content": text},
        "agent_server": {
            "message": {"role": role, "content": content},
            "run": bool(body.get("run", False)),
        },
    }
