"""What runs inside a conversation process: it connects back to its worker, receives its
assignment (settings and history), runs the kind's loop and relays its output.

The process ends when its loop is stopped or when the worker's end of the socket closes (the
worker died): a conversation process never outlives the worker that speaks for it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from convworker import wire
from convworker.kinds import Assignment, LoopRunner, runner_class
from convworker.kinds.base import JsonObject


class SocketOutbox:
    """Writes a runner's output to the worker, from whichever thread produces it (OpenHands
    calls back on its own threads)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def event(self, event_id: int, source: str, payload: JsonObject, delivery_id: str = "") -> None:
        self._send(
            {
                "type": "events",
                "events": [
                    {
                        "id": event_id,
                        "source": source,
                        "payload": payload,
                        "delivery_id": delivery_id,
                    }
                ],
            }
        )

    def status(self, status: JsonObject) -> None:
        self._send({"type": "status", "status": status})

    def completion(self, request_id: str, content: str, error: str) -> None:
        self._send(
            {"type": "completion", "request_id": request_id, "content": content, "error": error}
        )

    def _send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        if threading.get_ident() == self._thread:
            self._writer.write(data)
        else:
            self._loop.call_soon_threadsafe(self._writer.write, data)


async def serve(socket_path: str, token: str) -> None:
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=wire.LINE_LIMIT)
    writer.write(wire.encode({"type": "hello", "token": token, "pid": os.getpid()}))
    message = await wire.read(reader)
    if message is None or message.get("type") != "assign":
        return
    assignment = Assignment(
        conversation_id=message["conversation_id"],
        assignment=message["assignment"],
        agent_kind=message["agent_kind"],
        user_id=message["user_id"],
        settings=message["settings"],
        next_event_id=message["next_event_id"],
        initial_user_message=message["initial_user_message"],
        replay_events=message["replay_events"],
        history=message["history"],
        workspace=Path(message["workspace"]),
        worker_options=message["worker_options"],
    )
    outbox = SocketOutbox(writer)
    runner = runner_class(assignment.agent_kind)(assignment, outbox)
    completions: set[asyncio.Task[None]] = set()
    try:
        await runner.start()
        while (message := await wire.read(reader)) is not None:
            if message["type"] == "deliver":
                await runner.deliver(message["delivery_id"], message["payload"])
            elif message["type"] == "complete":
                # An LLM call takes seconds: deliveries go on meanwhile.
                task = asyncio.create_task(_complete(runner, outbox, message))
                completions.add(task)
                task.add_done_callback(completions.discard)
            elif message["type"] == "stop":
                break
    finally:
        for task in completions:
            task.cancel()
        await runner.stop()
        writer.write(wire.encode({"type": "released"}))
        await writer.drain()
        writer.close()


async def _complete(runner: LoopRunner, outbox: SocketOutbox, message: dict[str, Any]) -> None:
    try:
        content = await runner.complete(
            message["service_id"], message["llm_config"], message["messages"]
        )
    except Exception as exc:  # the reason goes back to the caller; secrets are not in it
        outbox.completion(message["request_id"], "", f"{type(exc).__name__}: {exc}"[:500])
    else:
        outbox.completion(message["request_id"], content, "")


def run(socket_path: str, token: str) -> None:
    """The process's whole life; it exits without running the parent's atexit handlers."""
    code = 0
    try:
        asyncio.run(serve(socket_path, token))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


if __name__ == "__main__":  # a cold start: python -m convworker.child SOCKET TOKEN
    import sys

    run(sys.argv[1], sys.argv[2])
