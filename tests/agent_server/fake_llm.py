"""The scripted LLM of tests/openhands, speaking to the SDK's agent: a user message
"run: X" gets a ``terminal`` call running X, its result gets ``finish``; a request without
tools (a title, a summary) gets plain text."""

from __future__ import annotations

from typing import Any

from tests.openhands.fake_llm import FakeLLM, asked_command


class SdkFakeLLM(FakeLLM):
    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        tools = {t["function"]["name"]: t for t in body.get("tools", []) if "function" in t}
        messages = body.get("messages", [])
        if not tools:
            return self._reply(content="A scripted answer.")
        if messages and messages[-1].get("role") == "tool":
            return self._call(tools, "finish", {"message": "Done."})
        return self._call(tools, "terminal", {"command": asked_command(messages)})
