"""A deterministic, OpenAI-compatible LLM on 127.0.0.1 for real OpenHands agents.

The script: a user message gets a tool call that runs a command (the text after "run:", or
``echo hello``); a tool result gets a ``finish`` call; a request for a conversation title
gets a fixed title; a request without tools whose last message starts "echo:" gets the
rest. Both of OpenHands' modes are served: native tool calls when the request lists tools,
and the ``<function=...>`` text format when it does not. Every request is kept,
so tests can check what the agent showed the LLM (its history after a restore, for one).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TITLE = "Scripted conversation title"


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def asked_command(messages: list[dict[str, Any]]) -> str:
    """The command of the newest user request "run: X" (the agent may append context after
    it), or ``echo hello``."""
    asked = [
        found.group(1).strip()
        for m in messages
        if m.get("role") == "user"
        for found in [re.search(r"run:[ \t]*(.+)", _text(m))]
        if found
    ]
    return asked[-1] if asked else "echo hello"


def _arguments(tool: dict[str, Any], known: dict[str, str]) -> dict[str, Any]:
    """Arguments for a tool's required parameters: ``known`` values, else the first allowed."""
    schema = tool.get("function", {}).get("parameters", {})
    arguments: dict[str, Any] = {}
    for name in schema.get("required", []):
        spec = schema.get("properties", {}).get(name, {})
        if name in known:
            arguments[name] = known[name]
        elif spec.get("enum"):
            arguments[name] = spec["enum"][0]
        elif spec.get("type") == "boolean":
            arguments[name] = False
        else:
            arguments[name] = ""
    return arguments


@dataclass
class FakeLLM:
    """The server and what it was asked."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeLLM:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.api_keys.append(self.headers.get("Authorization", ""))
                answer = json.dumps(fake.answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def prompts(self) -> list[str]:
        """Each request's messages as one text, for assertions about what the LLM saw."""
        return ["\n".join(_text(m) for m in r.get("messages", [])) for r in self.requests]

    # -- the script --------------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages", [])
        last = messages[-1] if messages else {}
        text = _text(last)
        tools = {t["function"]["name"]: t for t in body.get("tools", []) if "function" in t}
        if not tools and "title" in text.lower() and "conversation" in text.lower():
            return self._reply(content=TITLE)
        if not tools and text.startswith("echo:"):  # a completion outside the conversation
            return self._reply(content=text.removeprefix("echo:").strip())
        if last.get("role") == "tool" or text.startswith("EXECUTION RESULT of ["):
            return self._call(tools, "finish", {"message": "Done.", "task_completed": "true"})
        return self._call(
            tools, "execute_bash", {"command": asked_command(messages), "is_input": "false"}
        )

    def _call(self, tools: dict[str, Any], name: str, known: dict[str, str]) -> dict[str, Any]:
        if name in tools:
            arguments = _arguments(tools[name], known)
            call = {
                "id": f"call_{len(self.requests)}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            return self._reply(tool_calls=[call])
        # Prompt-based tool calling: OpenHands parses this format from the reply text.
        parameters = {"command": known.get("command", "")} if name == "execute_bash" else {}
        if name == "finish":
            parameters = {"message": known["message"], "task_completed": "true"}
        body = "".join(f"<parameter={k}>{v}</parameter>\n" for k, v in parameters.items())
        return self._reply(content=f"<function={name}>\n{body}</function>")

    def _reply(
        self, content: str | None = None, tool_calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        }
