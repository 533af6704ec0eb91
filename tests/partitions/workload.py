"""Clients that keep one conversation busy through a cluster under faults, recording a history
(see history.py): senders with request ids, stream readers that resume where they broke, and
probes whose sends must fail definitely and leave no trace."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import asyncpg
import grpc

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.codec import decode_event
from convsvc.v1 import conversation_service_pb2 as pb
from tests.partitions.conftest import LabNode
from tests.partitions.history import History, LogRow, Operation, StreamRead, identity

OWNER_HEADER = "x-convsvc-owner"
USER = "alice"
THINK_SECONDS = 0.02
"""A client's pause between two sends (keeps the log to thousands of events a test)."""


@dataclass
class Workload:
    conversation_id: str
    nodes: list[LabNode]
    history: History = field(default_factory=History)
    deadline: float = 3.0
    """Each attempt's gRPC deadline."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _acknowledged: int = 0
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    def start(self, *, rotating: int = 2, routing: int = 1, readers: int = 2) -> None:
        """Senders of three kinds: one pinned to each node (it retries there whatever it is
        told: what that node answers through a fault), ``rotating`` ones that move on to the
        next node after an answer of unknown outcome, and ``routing`` ones that follow the
        owner header as convclient does; and ``readers`` stream readers."""
        for n in range(len(self.nodes)):
            self._spawn(f"p{n}", n, "pinned")
        for n in range(rotating):
            self._spawn(f"c{n}", n % len(self.nodes), "rotating")
        for n in range(routing):
            self._spawn(f"o{n}", (n + 1) % len(self.nodes), "routing")
        for n in range(readers):
            self._tasks.append(asyncio.create_task(self._reader(f"r{n}", n % len(self.nodes))))

    def _spawn(self, name: str, home: int, mode: str) -> None:
        self._tasks.append(asyncio.create_task(self._sender(name, home, mode), name=f"send-{name}"))

    async def acknowledged(self, more: int, timeout: float = 60.0) -> None:
        """Waits until ``more`` further sends were acknowledged (the cluster makes progress)."""
        async with asyncio.timeout(timeout), self._progress:
            target = self._acknowledged + more
            await self._progress.wait_for(lambda: self._acknowledged >= target)

    async def stop(self) -> None:
        """Lets every sender finish the send it is in (retrying it until it is decided),
        then stops the readers."""
        self._stop.set()
        senders = [t for t in self._tasks if t.get_name().startswith("send")]
        await asyncio.wait_for(asyncio.gather(*senders), 90)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Stops every client at once (after a failure: nothing is waited for)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sender(self, name: str, home: int, mode: str) -> None:
        owner: LabNode | None = None
        for n in itertools.count():
            if self._stop.is_set():
                return
            if n % 10 == 9:
                await self._probe(f"{name}-probe-{n}", self.nodes[(home + n) % len(self.nodes)])
                continue
            text = f"{name}-{n}"
            for attempt in itertools.count():
                node = owner if mode == "routing" and owner is not None else self.nodes[home]
                op = Operation(name, text, node.name, time.monotonic())
                self.history.operations.append(op)
                call = node.stub.SendEvent(
                    pb.SendEventRequest(
                        conversation_id=self.conversation_id,
                        user_id=USER,
                        event=dict_to_struct({"action": "message", "args": {"content": text}}),
                        request_id=text,
                    ),
                    timeout=self.deadline,
                )
                try:
                    sent = await call
                    header = dict(await call.initial_metadata() or ())
                except grpc.aio.AioRpcError as exc:
                    op.completed = time.monotonic()
                    op.failed(exc)
                    if op.outcome == "fail" or attempt > 200:
                        break
                    owner = None
                    if mode != "pinned":
                        home = (home + 1) % len(self.nodes)
                    await asyncio.sleep(0.05)  # a retry's back-off, not a wait for an event
                    continue
                op.completed = time.monotonic()
                op.outcome, op.event_id = "ok", sent.event_id
                moved_to = header.get(OWNER_HEADER)
                owner = next((x for x in self.nodes if x.address == moved_to), owner)
                async with self._progress:
                    self._acknowledged += 1
                    self._progress.notify_all()
                break
            await asyncio.sleep(THINK_SECONDS)

    async def _probe(self, text: str, node: LabNode) -> None:
        """A send that must be refused whole (its event has no action): a definite failure,
        which the checker then looks for in the log."""
        op = Operation("probe", text, node.name, time.monotonic())
        self.history.operations.append(op)
        try:
            await node.stub.SendEvent(
                pb.SendEventRequest(
                    conversation_id=self.conversation_id,
                    user_id=USER,
                    event=dict_to_struct({"action": "", "args": {"content": text}}),
                    request_id=text,
                ),
                timeout=self.deadline,
            )
        except grpc.aio.AioRpcError as exc:
            op.failed(exc)
        else:
            op.outcome = "ok"
        op.completed = time.monotonic()

    async def _reader(self, name: str, home: int) -> None:
        next_id = 0
        for n in itertools.count():
            node = self.nodes[(home + n) % len(self.nodes)]
            read = StreamRead(name, node.name, next_id)
            self.history.streams.append(read)
            call = node.stub.StreamEvents(
                pb.StreamEventsRequest(
                    conversation_id=self.conversation_id, user_id=USER, start_id=next_id
                )
            )
            try:
                # A silent node (cut off) would hold the stream forever: a reader that hears
                # nothing for a while tries another node, as a client's keepalive would.
                while True:
                    async with asyncio.timeout(5):
                        response = await call.read()
                    if response is grpc.aio.EOF:
                        read.ended_by = "end"
                        break
                    for event in response.events:
                        read.events.append((event.id, identity(struct_to_dict(event.payload))))
                        next_id = event.id + 1
            except grpc.aio.AioRpcError as exc:
                read.ended_by = exc.code().name
            except TimeoutError:
                read.ended_by = "silence"
            finally:
                call.cancel()
            await asyncio.sleep(0.05)  # a reconnect's back-off


async def stored_log(dsn: str, conversation_id: str) -> list[LogRow]:
    """The conversation's log as PostgreSQL holds it, with who wrote each event under which
    epoch (read directly: the checker trusts no node)."""
    db = await asyncpg.connect(dsn)
    try:
        rows = await db.fetch(
            "SELECT id, encoded, epoch, writer FROM events WHERE conversation_id = $1 ORDER BY id",
            conversation_id,
        )
    finally:
        await db.close()
    return [
        LogRow(r["id"], decode_event(r["encoded"]).payload, r["epoch"], r["writer"]) for r in rows
    ]
