"""``worker-echo``: convsvc's echo agent, run on a worker (tests and benchmarks of the worker
path without an LLM). It answers each user message with the same text, after
``echo_reply_delay_seconds`` of "thinking" when its settings ask for it, and obeys run
control as OpenHands' controller does: ``change_agent_state`` paused holds its answers until
resumed (running); stopped drops what it was answering and waits for the user. In
confirmation mode (the ``confirmation_mode`` setting) it proposes each message as a command
and waits for its approval, as convsvc's echo agent does."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from convworker.kinds.base import JsonObject, LoopRunner

REPLY_DELAY_SETTING = "echo_reply_delay_seconds"
CONFIRMATION_SETTING = "confirmation_mode"
_HIGH_RISK_WORDS = ("rm ", "sudo ")
_REJECTED = "Action has been rejected by the user! Waiting for further user input."


def _state(state: str) -> JsonObject:
    return {
        "observation": "agent_state_changed",
        "content": "",
        "extras": {"agent_state": state, "reason": ""},
        "message": f"Agent state changed to {state}",
    }


def _command(command: str, confirmation_state: str) -> JsonObject:
    """A ``run`` action as OpenHands logs one in confirmation mode."""
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


class EchoRunner(LoopRunner):
    """Numbers its events from the assignment's next id; answers in a step of its own, so
    that a control reaches it while it thinks."""

    async def start(self) -> None:
        self._next_id = self.assignment.next_event_id
        self._waiting: deque[str] = deque()
        self._halt = asyncio.Event()
        self._step: asyncio.Task[None] | None = None
        self._paused = False
        self._proposed: str | None = None
        self._confirming = bool(self.assignment.settings.get(CONFIRMATION_SETTING))
        self._delay = float(self.assignment.settings.get(REPLY_DELAY_SETTING) or 0)
        self._emit("environment", _state("awaiting_user_input"))
        if self.assignment.initial_user_message is not None:
            await self.deliver("", self.assignment.initial_user_message)

    async def deliver(self, delivery_id: str, payload: JsonObject) -> None:
        self._emit("user", payload, delivery_id)
        args = payload.get("args")
        args = args if isinstance(args, dict) else {}
        if payload.get("action") == "message":
            self._waiting.append(str(args.get("content", "")))
            if self._paused or self._step is not None or self._proposed is not None:
                return
            if self._confirming:
                self._propose(self._waiting.popleft())
            elif self._delay > 0:
                self._step = asyncio.create_task(self._answer())
            else:  # answered at once, in the order messages arrive
                self._answer_waiting()
        elif payload.get("action") == "change_agent_state":
            await self._change_state(str(args.get("agent_state", "")))

    async def complete(
        self, service_id: str, llm_config: JsonObject, messages: list[JsonObject]
    ) -> str:
        """Echoes the last message's content, as the agent echoes messages."""
        return str(messages[-1].get("content", "")) if messages else ""

    async def stop(self) -> None:
        if self._step is not None:
            self._step.cancel()
            await asyncio.gather(self._step, return_exceptions=True)

    async def _change_state(self, asked: str) -> None:
        if asked in ("user_confirmed", "user_rejected") and self._proposed is not None:
            self._decided(asked == "user_confirmed")
        elif asked == "paused" and not self._paused:
            await self._halt_step()
            self._paused = True
            self._emit("environment", _state("paused"))
        elif asked == "running" and self._paused:
            self._paused = False
            if self._proposed is not None:  # paused while it waited: it asks again
                self._propose(self._proposed)
            elif self._waiting and self._delay > 0:
                self._step = asyncio.create_task(self._answer())
            elif self._waiting:
                self._answer_waiting()
            else:
                self._emit("environment", _state("running"))
                self._emit("environment", _state("awaiting_user_input"))
        elif asked == "stopped":
            await self._halt_step()
            self._paused = False
            self._waiting.clear()
            self._proposed = None
            self._emit("environment", _state("stopped"))

    async def _halt_step(self) -> None:
        if self._step is not None:
            self._halt.set()
            await asyncio.gather(self._step, return_exceptions=True)
            self._halt.clear()

    async def _answer(self) -> None:
        try:
            while self._waiting:
                self._emit("environment", _state("running"))
                if self._delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._halt.wait(), self._delay)
                if self._halt.is_set():
                    return
                self._reply(self._waiting.popleft())
        finally:
            self._step = None

    def _answer_waiting(self) -> None:
        while self._waiting:
            self._emit("environment", _state("running"))
            self._reply(self._waiting.popleft())

    def _propose(self, command: str) -> None:
        """Asks for approval first (OpenHands' order: the state, then the action)."""
        self._proposed = command
        self._emit("environment", _state("running"))
        self._emit("environment", _state("awaiting_user_confirmation"))
        self._emit("agent", _command(command, "awaiting_confirmation"))

    def _decided(self, approved: bool) -> None:
        command, self._proposed = self._proposed or "", None
        self._emit("environment", _state("user_confirmed" if approved else "user_rejected"))
        cause = self._next_id
        self._emit("agent", _command(command, "confirmed" if approved else "rejected"))
        if approved:
            self._emit("environment", _state("running"))
            observation: JsonObject = {
                "observation": "run",
                "content": command,
                "extras": {"command": command, "metadata": {"exit_code": 0}},
                "message": f"Command `{command}` executed with exit code 0.",
            }
        else:
            observation = {
                "observation": "user_rejected",
                "content": _REJECTED,
                "extras": {},
                "message": _REJECTED,
            }
        self._emit("environment", {**observation, "cause": cause})
        self._emit("environment", _state("awaiting_user_input"))
        if self._waiting:
            self._propose(self._waiting.popleft())

    def _reply(self, content: str) -> None:
        self._emit(
            "agent",
            {
                "action": "message",
                "message": content,
                "args": {"content": content, "image_urls": None, "wait_for_response": True},
            },
        )
        self._emit("environment", _state("awaiting_user_input"))

    def _emit(self, source: str, payload: JsonObject, delivery_id: str = "") -> None:
        self.outbox.event(self._next_id, source, payload, delivery_id)
        self._next_id += 1
