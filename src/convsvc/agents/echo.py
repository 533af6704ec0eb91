"""The built-in deterministic agent: it answers each user message with the same text.

It emits the events an OpenHands agent would, so that clients and the web tier see the real
event shapes without an LLM.
"""

from __future__ import annotations

import asyncio

from convsvc.agents.base import AgentLoop, agent_state_changed
from convsvc.domain import EventSource, JsonObject

REPLY_DELAY_SETTING = "echo_reply_delay_seconds"


class EchoAgent(AgentLoop):
    """Echoes user messages; other user actions only move it through ``running``."""

    name = "echo"

    async def start(self) -> None:
        await self.context.emit(agent_state_changed("awaiting_user_input"), EventSource.ENVIRONMENT)

    async def on_user_event(self, event: JsonObject) -> None:
        if event.get("action") != "message":
            return
        await self.context.emit(agent_state_changed("running"), EventSource.ENVIRONMENT)
        delay = float(self.context.settings.get(REPLY_DELAY_SETTING) or 0)
        if delay > 0:
            await asyncio.sleep(delay)  # simulates thinking time for tests and benchmarks
        args = event.get("args") or {}
        content = str(args.get("content", "")) if isinstance(args, dict) else ""
        await self.context.emit(
            {
                "action": "message",
                "message": content,
                "args": {"content": content, "image_urls": None, "wait_for_response": True},
            },
            EventSource.AGENT,
        )
        await self.context.emit(agent_state_changed("awaiting_user_input"), EventSource.ENVIRONMENT)
