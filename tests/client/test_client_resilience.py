"""What a client sees when the service goes away: a clear error in time, never a hang; and an
event tail that resumes across a restart with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from convclient import (
    AsyncConvsvcClient,
    ConvsvcClient,
    Event,
    ServiceUnavailableError,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class TailRecorder:
    """Runs a tail in the background and lets the test wait until a condition holds."""

    def __init__(self, client: AsyncConvsvcClient, conversation_id: str) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(client, conversation_id))

    async def _run(self, client: AsyncConvsvcClient, conversation_id: str) -> None:
        async for batch in client.tail_events(conversation_id):
            self.events.extend(batch.events)
            self._changed.set()

    async def until(self, done: Callable[[list[Event]], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.events):
                if self._task.done():
                    self._task.result()  # raises what ended the tail
                    raise AssertionError("the tail ended")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def echoed(content: str) -> Callable[[list[Event]], bool]:
    return lambda events: any(
        e.source == "agent" and e.payload.get("message") == content for e in events
    )


def message(content: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": content}}


@pytest.mark.parametrize("stop", ["kill", "terminate"])
async def test_a_tail_resumes_across_a_restart_without_gap_or_duplicate(
    server_process: Callable[..., Any], stop: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    server = server_process(extra_args=["--listen", address])
    server.start()
    async with AsyncConvsvcClient(address=address, stream_reconnect_seconds=60) as client:
        await client.start_conversation("c1")
        tail = TailRecorder(client, "c1")
        try:
            for n in range(5):
                await client.send_event(message(f"before-{n}"), conversation_id="c1")
            await tail.until(echoed("before-4"))

            getattr(server, stop)()
            await asyncio.to_thread(server.start)
            await client.wait_until_ready(30)  # the channel may still be backing off
            # Running loops come back stopped after a restart; starting it again keeps history.
            await client.start_conversation("c1")
            for n in range(3):
                await client.send_event(message(f"after-{n}"), conversation_id="c1")
            await tail.until(echoed("after-2"))
        finally:
            await tail.stop()
        ids = [e.id for e in tail.events]
        assert ids == list(range(len(ids))), ids
        stored = [e.id async for e in client.iter_events("c1")]
        assert stored[: len(ids)] == ids


async def test_an_unreachable_service_fails_fast_and_clearly() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with AsyncConvsvcClient(address=address, timeout_seconds=3) as client:
        async with asyncio.timeout(10):
            with pytest.raises(ServiceUnavailableError) as caught:
                await client.list_conversations()
    assert address in str(caught.value)
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_blocking_client_fails_fast_too() -> None:
    address = f"127.0.0.1:{free_port()}"
    with (
        ConvsvcClient(address=address, timeout_seconds=3) as client,
        pytest.raises(ServiceUnavailableError) as caught,
    ):
        client.get_conversation("c1")
    assert address in str(caught.value)


async def test_a_tail_gives_up_after_its_reconnect_window() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with AsyncConvsvcClient(address=address, stream_reconnect_seconds=1) as client:
        async with asyncio.timeout(15):
            with pytest.raises(ServiceUnavailableError) as caught:
                async for _ in client.tail_events("c1"):
                    pass
    assert caught.value.reason == "STREAM_LOST"
