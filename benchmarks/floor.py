"""The floor: a bare grpc.aio server with no business logic, and its load.

``python -m benchmarks.floor --ready-file F`` serves an empty unary method and a server stream
that sends N small items, one per message or in batches, as fast as grpc.aio can.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

SERVICE = "benchfloor.Floor"
EMPTY = f"/{SERVICE}/Empty"
STREAM = f"/{SERVICE}/Stream"
ITEM = b"e" * 120  # about the size of a small encoded event


async def _empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    count, batch = (int(part) for part in request.decode().split(","))
    message = ITEM * batch
    for _ in range(count // batch):
        yield message


async def serve(ready_file: Path) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Empty": grpc.unary_unary_rpc_method_handler(_empty),
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
