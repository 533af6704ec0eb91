"""Clients that keep sending through the cluster while nodes die, and what they saw."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.domain import JsonObject
from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Node

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class Progress:
    """Acknowledgements counted across senders, awaited without polling."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def acknowledge(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def reach(self, count: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


@dataclass
class Sender:
    """Sends numbered messages with request ids, retrying each on every node in turn until
    one acknowledges it: what was acknowledged must be in the log, once."""

    conversation_id: str
    nodes: list[Node]
    name: str
    acknowledged: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)

    async def send(self, text: str, deadline: float = 30.0) -> int:
        request_id = f"{self.name}-{text}"
        event = dict_to_struct({"action": "message", "args": {"content": text}})
        give_up = time.monotonic() + deadline
        for node in itertools.cycle(self.nodes):
            try:
                sent = await node.stub.SendEvent(
                    pb.SendEventRequest(
                        conversation_id=self.conversation_id,
                        user_id="alice",
                        event=event,
                        request_id=request_id,
                    ),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.05)  # a retry's back-off, not a wait for an event
                continue
            self.acknowledged[text] = sent.event_id
            await self.progress.acknowledge()
            return sent.event_id
        raise AssertionError("unreachable")

    async def run(self, stop: asyncio.Event) -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            await self.send(f"{self.name}:{n}")


async def whole_log(node: Node, conversation_id: str) -> list[JsonObject]:
    """Every stored event of a conversation, read through one node."""
    payloads: list[JsonObject] = []
    token = ""
    while True:
        page = await node.stub.SearchEvents(
            pb.SearchEventsRequest(
                conversation_id=conversation_id, page_size=1000, page_token=token
            )
        )
        payloads.extend(struct_to_dict(e.payload) for e in page.events)
        token = page.next_page_token
        if not token:
            return payloads


def user_messages(payloads: list[JsonObject]) -> dict[str, list[int]]:
    """Where each user message text appears in a log (a list: it must be exactly one)."""
    where: dict[str, list[int]] = {}
    for p in payloads:
        if p.get("source") == "user" and p.get("action") == "message":
            where.setdefault(str(p.get("message")), []).append(int(p["id"]))
    return where
