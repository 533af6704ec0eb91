"""The built-in deterministic agent: it answers each user message with the same text.

It emits the events an OpenHands agent would, so that clients and the web tier see the real
event shapes without an LLM. It obeys run control as OpenHands' controller does: paused, it
answers nothing until resumed (messages wait); interrupted, it drops what it was answering
and what waited, and waits for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from convsvc.agents.base import AgentLoop, agent_state_changed
from convsvc.domain import EventSource, JsonObject
from convsvc.tasks import TaskOwner

REPLY_DELAY_SETTING = "echo_reply_delay_seconds"


class EchoAgent(AgentLoop):
    """Echoes user messages, one at a time, in a step of its own (so that a control can
    reach it while it "thinks")."""

    name = "echo"

    async def start(self) -> None:
        self._waiting: deque[str] = deque()
        self._halt = asyncio.Event()
        self._steps = TaskOwner()
        self._step: asyncio.Task[None] | None = None
        self._paused = False
        await self._state("awaiting_user_input")

    async def on_user_event(self, event: JsonObject) -> None:
        action = event.get("action")
        args = event.get("args")
        args = args if isinstance(args, dict) else {}
        if action == "message":
            self._waiting.append(str(args.get("content", "")))
            if self._paused or self._step is not None:
                return
            if self._delay() > 0:
                self._step = self._steps.spawn(self._answer())
            else:
                # Answered here, before the message's commit: they share it (pipelining).
                while self._waiting:
                    await self._state("running")
                    await self._reply(self._waiting.popleft())
        elif action == "change_agent_state":
            await self._change_state(str(args.get("agent_state", "")))

    async def stop(self) -> None:
        await self._steps.cancel_all()

    async def _change_state(self, asked: str) -> None:
        if asked == "paused" and not self._paused:
            await self._halt_step()
            self._paused = True
            await self._state("paused")
        elif asked == "running" and self._paused:
            self._paused = False
            if self._waiting:  # the step reports "running" first
                self._step = self._steps.spawn(self._answer())
            else:
                await self._state("running")
                await self._state("awaiting_user_input")
        elif asked == "stopped":
            await self._halt_step()
            self._paused = False
            self._waiting.clear()
            await self._state("stopped")

    async def _halt_step(self) -> None:
        """Stops the step at its next check and waits for it (its message stays waiting)."""
        if self._step is not None:
            self._halt.set()
            await asyncio.gather(self._step, return_exceptions=True)
            self._halt.clear()

    async def _answer(self) -> None:
        try:
            delay = self._delay()
            while self._waiting:
                await self._state("running")
                if delay > 0:
                    # Thinking time for tests and benchmarks; a control cuts it short.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._halt.wait(), delay)
                if self._halt.is_set():
                    return
                await self._reply(self._waiting.popleft())
                if self._halt.is_set():
                    return
        finally:
            self._step = None

    def _delay(self) -> float:
        return float(self.context.settings.get(REPLY_DELAY_SETTING) or 0)

    async def _reply(self, content: str) -> None:
        await self.context.emit(
            {
                "action": "message",
                "message": content,
                "args": {"content": content, "image_urls": None, "wait_for_response": True},
            },
            EventSource.AGENT,
        )
        await self._state("awaiting_user_input")

    async def _state(self, state: str) -> None:
        await self.context.emit(agent_state_changed(state), EventSource.ENVIRONMENT)
