"""The built-in deterministic agent: it answers each user message with the same text.

It emits the events an OpenHands agent would, so that clients and the web tier see the real
event shapes without an LLM. It obeys run control as OpenHands' controller does: paused, it
answers nothing until resumed (messages wait); interrupted, it drops what it was answering
and what waited, and waits for the user. In confirmation mode (the ``confirmation_mode``
setting) it proposes each message as a command instead, waits for its approval as
OpenHands does and then "runs" it (the observation's output is the command) or drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from convsvc.agents.base import AgentLoop, agent_state_changed
from convsvc.domain import EventSource, JsonObject
from convsvc.tasks import TaskOwner

REPLY_DELAY_SETTING = "echo_reply_delay_seconds"
CONFIRMATION_SETTING = "confirmation_mode"
_HIGH_RISK_WORDS = ("rm ", "sudo ")


def proposed_command(command: str, confirmation_state: str) -> JsonObject:
    """A ``run`` action as OpenHands logs one in confirmation mode (risk: HIGH when the
    command removes files or asks for root, else LOW)."""
    risky = any(word in f"{command} " for word in _HIGH_RISK_WORDS)
    return {
        "action": "run",
        "message": f"Running command: {command}",
        "args": {
            "command": command,
            "is_input": False,
            "thought": "",
            "blocking": False,
            "hidden": False,
            "confirmation_state": confirmation_state,
            "security_risk": 2 if risky else 0,
        },
    }


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
        self._proposed: str | None = None
        await self._state("awaiting_user_input")

    async def on_user_event(self, event: JsonObject) -> None:
        action = event.get("action")
        args = event.get("args")
        args = args if isinstance(args, dict) else {}
        if action == "message":
            self._waiting.append(str(args.get("content", "")))
            if self._paused or self._step is not None or self._proposed is not None:
                return
            if self.context.settings.get(CONFIRMATION_SETTING):
                await self._propose(self._waiting.popleft())
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
        if asked in ("user_confirmed", "user_rejected") and self._proposed is not None:
            await self._decided(asked == "user_confirmed")
        elif asked == "paused" and not self._paused:
            await self._halt_step()
            self._paused = True
            await self._state("paused")
        elif asked == "running" and self._paused:
            self._paused = False
            if self._proposed is not None:  # paused while it waited: it asks again
                await self._propose(self._proposed)
            elif self._waiting:  # the step reports "running" first
                self._step = self._steps.spawn(self._answer())
            else:
                await self._state("running")
                await self._state("awaiting_user_input")
        elif asked == "stopped":
            await self._halt_step()
            self._paused = False
            self._waiting.clear()
            self._proposed = None
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

    async def _propose(self, command: str) -> None:
        """Asks for approval before "running" the command (OpenHands' order: the state,
        then the action)."""
        self._proposed = command
        await self._state("running")
        await self._state("awaiting_user_confirmation")
        await self.context.emit(
            proposed_command(command, "awaiting_confirmation"), EventSource.AGENT
        )

    async def _decided(self, approved: bool) -> None:
        command, self._proposed = self._proposed or "", None
        await self._state("user_confirmed" if approved else "user_rejected")
        cause = await self.context.emit(
            proposed_command(command, "confirmed" if approved else "rejected"), EventSource.AGENT
        )
        if approved:
            await self._state("running")
            await self.context.emit(
                {
                    "observation": "run",
                    "content": command,
                    "extras": {"command": command, "metadata": {"exit_code": 0}},
                    "message": f"Command `{command}` executed with exit code 0.",
                    "cause": cause,
                },
                EventSource.ENVIRONMENT,
            )
        else:
            await self.context.emit(
                {
                    "observation": "user_rejected",
                    "content": "Action has been rejected by the user! Waiting for further "
                    "user input.",
                    "extras": {},
                    "message": "Action has been rejected by the user! Waiting for further "
                    "user input.",
                    "cause": cause,
                },
                EventSource.ENVIRONMENT,
            )
        await self._state("awaiting_user_input")
        if self._waiting:
            await self._propose(self._waiting.popleft())

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
