"""Conversation processes, seen from the worker: started (forked by the zygote, or a new
interpreter), connected over a Unix socket, spoken to in JSON lines, and killed if they do
not stop in time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convworker import wire
from convworker.kinds import process_environment
from convworker.zygote import READY_FD_VARIABLE

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_SECONDS = 120.0
"""How long a new process may take to connect back (a cold start imports the agent)."""


class ConversationProcess:
    """One conversation's process and the socket to it."""

    def __init__(self, conversation_id: str, token: str) -> None:
        self.conversation_id = conversation_id
        self.token = token
        self.pid = 0
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writer: asyncio.StreamWriter | None = None

    def send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(wire.encode(message))

    def kill(self) -> None:
        """SIGKILL to the process and its group (the commands its runtime started), unless
        it already exited: its pid may belong to another process by now."""
        if self.pid and not self.exited.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


OnMessage = Callable[[ConversationProcess, dict[str, Any]], None]
OnExit = Callable[[ConversationProcess], None]


class ProcessLauncher:
    """Starts conversation processes and routes what they say."""

    def __init__(
        self,
        kinds: tuple[str, ...],
        fork: bool,
        on_message: OnMessage,
        on_exit: OnExit,
        on_broken: Callable[[], None] = lambda: None,
    ) -> None:
        self._kinds = kinds
        self._fork = fork
        self._on_message = on_message
        self._on_exit = on_exit
        self._on_broken = on_broken
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="convworker-"))
        self._socket = str(self._dir / "loops.sock")
        self._server: asyncio.Server | None = None
        self._zygote: asyncio.subprocess.Process | None = None
        self._waiting: dict[str, ConversationProcess] = {}
        self._processes: set[ConversationProcess] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._accept, self._socket, limit=wire.LINE_LIMIT
        )
        os.chmod(self._socket, 0o600)  # settings with secrets cross it
        if self._fork:
            read_end, write_end = os.pipe()
            self._zygote = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "convworker.zygote",
                self._socket,
                *self._kinds,
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_end,),
                env={
                    **process_environment(self._kinds, os.environ),
                    READY_FD_VARIABLE: str(write_end),
                },
            )
            os.close(write_end)
            # Wait until the agent code is imported (seconds for OpenHands).
            with os.fdopen(read_end, "rb") as ready:
                line = await asyncio.to_thread(ready.readline)
            if line.strip() != b"ready":
                raise RuntimeError("the zygote process failed to import the agent code")
            self._watch = asyncio.create_task(self._watch_zygote(self._zygote))

    async def _watch_zygote(self, zygote: asyncio.subprocess.Process) -> None:
        await zygote.wait()
        if not self._stopping:
            log.error("the zygote process exited (code %s)", zygote.returncode)
            self._on_broken()

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for process in list(self._processes):
            process.kill()
        if self._zygote is not None and self._zygote.stdin is not None:
            self._zygote.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self._zygote.terminate()
            await self._zygote.wait()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self._socket)
            os.rmdir(self._dir)

    @property
    def broken(self) -> bool:
        """True once the zygote has exited: no conversation can start any more."""
        return self._zygote is not None and self._zygote.returncode is not None

    async def launch(self, conversation_id: str, assign: dict[str, Any]) -> ConversationProcess:
        """Starts a process for an assignment and hands it over once it connects."""
        token = secrets.token_hex(16)
        process = ConversationProcess(conversation_id, token)
        self._waiting[token] = process
        try:
            if self._zygote is not None:
                if self._zygote.returncode is not None or self._zygote.stdin is None:
                    raise RuntimeError("the zygote process has exited")
                self._zygote.stdin.write(wire.encode({"token": token}))
                await self._zygote.stdin.drain()
            else:
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "convworker.child",
                    self._socket,
                    token,
                    start_new_session=True,
                    env=process_environment(self._kinds, os.environ),
                )
            await asyncio.wait_for(asyncio.shield(process.connected), _CONNECT_TIMEOUT_SECONDS)
        finally:
            self._waiting.pop(token, None)
        process.send({"type": "assign", **assign})
        return process

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await wire.read(reader)
        process = self._waiting.get(hello.get("token", "")) if hello else None
        if hello is None or process is None or process.connected.done():
            writer.close()
            return
        process.pid = int(hello["pid"])
        process._writer = writer
        process.connected.set_result(None)
        self._processes.add(process)
        try:
            while (message := await wire.read(reader)) is not None:
                self._on_message(process, message)
        except (ConnectionError, ValueError) as exc:
            log.warning("conversation %s: broken socket (%s)", process.conversation_id, exc)
        finally:
            self._processes.discard(process)
            writer.close()
            if not process.exited.done():
                process.exited.set_result(None)
            self._on_exit(process)
