"""``worker-echo``: convsvc's echo agent, run on a worker (tests and benchmarks of the worker
path without an LLM). It answers each user message with the same text."""

from __future__ import annotations

from convworker.kinds.base import JsonObject, LoopRunner


def _state(state: str) -> JsonObject:
    return {
        "observation": "agent_state_changed",
        "content": "",
        "extras": {"agent_state": state, "reason": ""},
        "message": f"Agent state changed to {state}",
    }


class EchoRunner(LoopRunner):
    """Numbers its events from the assignment's next id."""

    async def start(self) -> None:
        self._next_id = self.assignment.next_event_id
        self._emit("environment", _state("awaiting_user_input"))
        if self.assignment.initial_user_message is not None:
            await self.deliver("", self.assignment.initial_user_message)

    async def deliver(self, delivery_id: str, payload: JsonObject) -> None:
        self._emit("user", payload, delivery_id)
        if payload.get("action") != "message":
            return
        args = payload.get("args")
        content = str(args.get("content", "")) if isinstance(args, dict) else ""
        self._emit("environment", _state("running"))
        self._emit(
            "agent",
            {
                "action": "message",
                "message": content,
                "args": {"content": content, "image_urls": None, "wait_for_response": True},
            },
        )
        self._emit("environment", _state("awaiting_user_input"))

    async def complete(
        self, service_id: str, llm_config: JsonObject, messages: list[JsonObject]
    ) -> str:
        """Echoes the last message's content, as the agent echoes messages."""
        return str(messages[-1].get("content", "")) if messages else ""

    async def stop(self) -> None:
        """Nothing to release."""

    def _emit(self, source: str, payload: JsonObject, delivery_id: str = "") -> None:
        self.outbox.event(self._next_id, source, payload, delivery_id)
        self._next_id += 1
