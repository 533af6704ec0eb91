"""The floor: a bare grpc.aio server with no business logic, and its load.

``python -m benchmarks.floor --ready-file F`` serves an empty unary method, a server stream
that sends N small items, one per message or in batches, as fast as grpc.aio can, and the
durable floor: an empty method that answers only once a page appended to a file is fsynced,
with the group commit any durable service would use (calls waiting together share one fsync
on a writer thread). It is what any grpc.aio service that acknowledges after durability pays
on this machine before it does any work of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

SERVICE = "benchfloor.Floor"
EMPTY = f"/{SERVICE}/Empty"
DURABLE = f"/{SERVICE}/Durable"
STREAM = f"/{SERVICE}/Stream"
ITEM = b"e" * 120  # about the size of a small encoded event
PAGE = b"p" * 4096  # what a small SQLite commit appends to its write-ahead log


class GroupCommitLog:
    """Appends a page per batch of waiting calls and fsyncs it on a thread of its own."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._waiting: list[asyncio.Future[None]] = []
        self._committing = False
        self._jobs: queue.SimpleQueue[tuple[list[asyncio.Future[None]], Any]] = queue.SimpleQueue()
        threading.Thread(target=self._sync_forever, daemon=True).start()

    async def durable(self) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        if not self._committing:
            self._committing = True
            self._commit_next()
        await done

    def _commit_next(self) -> None:
        batch, self._waiting = self._waiting, []
        self._jobs.put((batch, asyncio.get_running_loop()))

    def _sync_forever(self) -> None:
        while True:
            batch, loop = self._jobs.get()
            os.write(self._fd, PAGE)
            os.fsync(self._fd)
            loop.call_soon_threadsafe(self._committed, batch)

    def _committed(self, batch: list[asyncio.Future[None]]) -> None:
        for done in batch:
            if not done.done():
                done.set_result(None)
        if self._waiting:
            self._commit_next()
        else:
            self._committing = False


async def _empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    count, batch = (int(part) for part in request.decode().split(","))
    message = ITEM * batch
    for _ in range(count // batch):
        yield message


async def serve(ready_file: Path) -> None:
    log = GroupCommitLog(ready_file.with_name(ready_file.name + ".log"))

    async def durable(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await log.durable()
        return b""

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Empty": grpc.unary_unary_rpc_method_handler(_empty),
            "Durable": grpc.unary_unary_rpc_method_handler(durable),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(ready_file.write_text, f"127.0.0.1:{port}")
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.ready_file))
    except ImportError:
        asyncio.run(serve(args.ready_file))


if __name__ == "__main__":
    main()
