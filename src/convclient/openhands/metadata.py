"""The conversation metadata OpenHands' own manager keeps up to date as events happen: the
title (generated from the first user message), ``last_updated_at`` and the accumulated cost
and tokens. With the loops in convsvc, the web process that starts or joins a conversation
follows its events and does the same.

Several web replicas following one conversation write the same values; each may generate a
title once (the first write wins on the next read: the title is only set while it is the
default).

OpenHands' file conversation store does not write atomically: a read during a write sees an
empty file (and its route answers 500). Its own manager writes on every event; this one writes
a new title or cost at once and otherwise at most once per second, to keep that window rare.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from openhands.core.config import LLMConfig, OpenHandsConfig
from openhands.server.config.server_config import ServerConfig
from openhands.storage.conversation.conversation_store import ConversationStore
from openhands.storage.data_models.settings import Settings
from openhands.utils.conversation_summary import (
    generate_conversation_title,
    get_default_conversation_title,
)
from openhands.utils.import_utils import get_impl

from convclient.client import AsyncConvsvcClient
from convclient.errors import ConvsvcClientError
from convclient.openhands.compat import openhands_version

log = logging.getLogger(__name__)

_TITLE_TIMEOUT_SECONDS = 30.0
_QUIET_SAVE_SECONDS = 1.0
"""Least time between two writes that only move ``last_updated_at``."""

EmitToRoom = Callable[[dict[str, Any]], Awaitable[None]]


async def conversation_store(
    config: OpenHandsConfig, server_config: ServerConfig, user_id: str | None
) -> ConversationStore:
    store_class = get_impl(ConversationStore, server_config.conversation_store_class)
    store: ConversationStore = await store_class.get_instance(config, user_id)
    return store


async def generate_title(message: str, settings: Settings, config: OpenHandsConfig) -> str:
    """OpenHands' title for a first message: the LLM's, else the message cut at 30.

    OpenHands' title helpers call the LLM synchronously (with its retries): they run on a
    thread of their own, never on the web server's event loop, as OpenHands' own manager
    runs them, and a title that takes longer than ``_TITLE_TIMEOUT_SECONDS`` is given up."""
    try:
        if settings.llm_model:
            llm_config = LLMConfig(
                model=settings.llm_model,
                api_key=settings.llm_api_key,
                base_url=settings.llm_base_url,
            )

            def generate() -> Any:
                if openhands_version() >= (0, 54):
                    from openhands.llm.llm_registry import LLMRegistry

                    return asyncio.run(
                        generate_conversation_title(message, llm_config, LLMRegistry(config))
                    )
                return asyncio.run(generate_conversation_title(message, llm_config))

            title = await asyncio.wait_for(asyncio.to_thread(generate), _TITLE_TIMEOUT_SECONDS)
            if title:
                return str(title)
    except Exception:
        log.warning("title generation failed; the title is the message", exc_info=True)
    message = message.strip()
    return message[:30] + ("..." if len(message) > 30 else "")


def _first_user_text(event: dict[str, Any]) -> str | None:
    if event.get("source") != "user" or event.get("action") != "message":
        return None
    args = event.get("args") or {}
    content = args.get("content") if isinstance(args, dict) else None
    return content if isinstance(content, str) and content.strip() else None


class MetadataFollower:
    """Follows one conversation's events and keeps its metadata as OpenHands' manager does."""

    def __init__(
        self,
        client: AsyncConvsvcClient,
        conversation_id: str,
        user_id: str | None,
        settings: Settings,
        config: OpenHandsConfig,
        server_config: ServerConfig,
        emit_to_room: EmitToRoom,
    ) -> None:
        self.conversation_id = conversation_id
        self._client = client
        self._user_id = user_id
        self._settings = settings
        self._config = config
        self._server_config = server_config
        self._emit_to_room = emit_to_room
        self._task: asyncio.Task[None] | None = None
        self._last_save = 0.0
        self._trailing_save: asyncio.Task[None] | None = None

    def start(self, start_id: int) -> None:
        self._task = asyncio.create_task(
            self._follow(start_id), name=f"metadata:{self.conversation_id}"
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        for task in (self._task, self._trailing_save):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _follow(self, start_id: int) -> None:
        try:
            async for batch in self._client.tail_events(
                self.conversation_id, user_id=self._user_id or "", start_id=start_id
            ):
                events = [event.payload for event in batch.events]
                if events:
                    await self._update(events)
                if any(
                    e.get("observation") == "agent_state_changed"
                    and (e.get("extras") or {}).get("agent_state") == "stopped"
                    for e in events
                ):
                    return  # the loop stopped; a later start or join follows again
        except ConvsvcClientError as exc:
            log.warning("metadata of %s no longer followed: %s", self.conversation_id, exc)

    async def _update(self, events: list[dict[str, Any]]) -> None:
        costs = [e for e in events if isinstance(e.get("llm_metrics"), dict)]
        names_a_title = any(map(_first_user_text, events))
        loop = asyncio.get_running_loop()
        if not costs and not names_a_title:
            wait = self._last_save + _QUIET_SAVE_SECONDS - loop.time()
            if wait > 0:
                if self._trailing_save is None or self._trailing_save.done():
                    self._trailing_save = asyncio.create_task(self._save_later(wait))
                return
        await self._save(events)

    async def _save_later(self, wait: float) -> None:
        await asyncio.sleep(wait)  # a debounce: time is what is waited for
        await self._save([])

    async def _save(self, events: list[dict[str, Any]]) -> None:
        self._last_save = asyncio.get_running_loop().time()
        store = await conversation_store(self._config, self._server_config, self._user_id)
        try:
            metadata = await store.get_metadata(self.conversation_id)
        except FileNotFoundError:
            return  # not created through OpenHands' routes: there is no metadata to keep
        metadata.last_updated_at = datetime.now(UTC)
        for event in events:
            metrics = event.get("llm_metrics")
            if isinstance(metrics, dict) and "accumulated_cost" in metrics:
                metadata.accumulated_cost = metrics["accumulated_cost"]
                usage = metrics.get("accumulated_token_usage") or {}
                prompt = int(usage.get("prompt_tokens") or 0)
                completion = int(usage.get("completion_tokens") or 0)
                metadata.prompt_tokens = prompt
                metadata.completion_tokens = completion
                metadata.total_tokens = prompt + completion
        new_title = None
        if metadata.title == get_default_conversation_title(self.conversation_id):
            first = next(filter(None, map(_first_user_text, events)), None)
            if first is not None:
                new_title = await generate_title(first, self._settings, self._config)
                metadata.title = new_title
        await store.save_metadata(metadata)
        if new_title is not None:
            await self._emit_to_room(
                {
                    "status_update": True,
                    "type": "info",
                    "message": self.conversation_id,
                    "conversation_title": new_title,
                }
            )
