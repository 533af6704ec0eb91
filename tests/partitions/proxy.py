"""A TCP proxy that makes a link slow and lossy, for the partition tests (this kernel has no
netem). Run as its own process on the link under test:

    python -m tests.partitions.proxy --listen 10.213.10.2:6432 --target 127.0.0.1:5432 \\
        --delay 0.1 --loss 0.05 --seed 7

Every chunk read from either side reaches the other ``--delay`` seconds later, in order. A
packet lost on a TCP connection reaches the application late, not never: the sender resends
it after its retransmission timeout (at least 200 ms on Linux) and everything behind it
waits. So a lost chunk here is delivered one retransmission timeout late (doubling while it
is "lost again"), holding up the chunks behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

RETRANSMISSION_TIMEOUT = 0.2


class Link:
    def __init__(self, delay: float, loss: float, rng: random.Random) -> None:
        self.delay = delay
        self.loss = loss
        self.rng = rng

    def lateness(self) -> float:
        wait = self.delay
        timeout = RETRANSMISSION_TIMEOUT
        while self.rng.random() < self.loss:
            wait += timeout
            timeout *= 2
        return wait

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            not_before = 0.0
            while True:
                due, chunk = await queue.get()
                not_before = max(due, not_before)  # in order: nothing overtakes a late chunk
                pause = not_before - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                if not chunk:
                    writer.close()
                    return
                writer.write(chunk)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.lateness(), chunk))
                if not chunk:
                    break
            await delivering
        except (ConnectionError, OSError):
            delivering.cancel()
            writer.close()


async def serve(listen: str, target: str, link: Link) -> None:
    target_host, target_port = target.rsplit(":", 1)

    async def connected(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            link.pump(client_r, server_w), link.pump(server_r, client_w), return_exceptions=True
        )

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(connected, host, int(port))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds, each way")
    parser.add_argument("--loss", type=float, default=0.0, help="probability per chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    link = Link(args.delay, args.loss, random.Random(args.seed))
    asyncio.run(serve(args.listen, args.target, link))


if __name__ == "__main__":
    main()
