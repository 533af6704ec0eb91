"""Load generators. Each public function runs in its own process (see processes.in_processes)
and drives a server over real gRPC with the generated stubs: these measure the service, not a
client library."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from benchmarks import floor
from benchmarks.processes import run_async
from benchmarks.stats import latency_summary
from convclient import AsyncConvsvcClient
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]
# A user action the echo agent ignores: a send then costs one event, not a whole reply.
NOTE = {"action": "bench_note", "args": {"n": 0}}


def _event_frames_type() -> Any:
    """A message declaring only ``repeated bytes events = 1``: a StreamEventsResponse read as
    it reads holds each event's bytes undecoded (the floor's client decodes nothing either)."""
    file = descriptor_pb2.FileDescriptorProto(name="bench_frames.proto", package="bench")
    frames = file.message_type.add(name="EventFrames")
    frames.field.add(
        name="events",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.EventFrames"))


EventFrames = _event_frames_type()
STREAM_EVENTS = "/convsvc.v1.ConversationService/StreamEvents"


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def message(content: str) -> struct_pb2.Struct:
    return struct({"action": "message", "args": {"content": content}})


async def _workers(
    concurrency: int, count: int, call: Any, finished: list[float] | None = None
) -> tuple[float, list[float]]:
    """Runs ``count`` calls, ``concurrency`` at a time; returns (elapsed, latencies), and
    appends each call's end (perf_counter) to ``finished`` when given."""
    latencies: list[float] = []
    per_worker = [
        count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)
    ]

    async def worker(index: int, calls: int) -> None:
        for n in range(calls):
            began = time.perf_counter()
            await call(index, n)
            ended = time.perf_counter()
            latencies.append(ended - began)
            if finished is not None:
                finished.append(ended)

    began = time.perf_counter()
    await asyncio.gather(*(worker(i, calls) for i, calls in enumerate(per_worker)))
    return time.perf_counter() - began, latencies


def _tenths(began: float, finished: list[float]) -> list[float]:
    """Calls per second in each tenth of the calls, in the order they finished."""
    ends = sorted(finished)
    size = len(ends) // 10
    if not size:
        return []
    rates, start = [], began
    for tenth in range(10):
        end = ends[(tenth + 1) * size - 1]
        rates.append(size / max(end - start, 1e-9))
        start = end
    return rates


def _rate(count: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    return {"calls_per_s": count / elapsed, **latency_summary(latencies)}


# -- the floor --------------------------------------------------------------------------------


def floor_unary(
    address: str, concurrency: int, count: int, method: str = floor.EMPTY
) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            empty = channel.unary_unary(method)
            for _ in range(50):  # warm-up
                await empty(b"")
            elapsed, latencies = await _workers(concurrency, count, lambda i, n: empty(b""))
        return _rate(count, elapsed, latencies)

    return run_async(run())


def floor_stream(address: str, count: int, batch: int) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stream = channel.unary_stream(floor.STREAM)
            began = time.perf_counter()
            async for _ in stream(f"{count},{batch}".encode()):
                pass
            elapsed = time.perf_counter() - began
        return {"items_per_s": count / elapsed}

    return run_async(run())


# -- convsvc ----------------------------------------------------------------------------------


SEND_EVENT = "/convsvc.v1.ConversationService/SendEvent"


def send_events(
    address: str, concurrency: int, count: int, tag: str, via: str | None = None
) -> dict[str, float]:
    """SendEvent calls, each worker to its own running conversation, started through
    ``address`` and sent through ``via`` (another node of a cluster) when given."""

    async def run() -> dict[str, float]:
        async with (
            grpc.aio.insecure_channel(address) as channel,
            grpc.aio.insecure_channel(via or address) as send_channel,
        ):
            stub = pb_grpc.ConversationServiceStub(channel)
            sender = pb_grpc.ConversationServiceStub(send_channel)
            ids = [f"{tag}-{i}" for i in range(concurrency)]
            for cid in ids:
                await stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))
            event = struct(NOTE)
            for cid in ids:  # warm-up
                await sender.SendEvent(pb.SendEventRequest(conversation_id=cid, event=event))
            # As the floor's client does: each request's bytes made once, the answer's bytes
            # not parsed (a failed call raises). The client shares the machine's two cores
            # with the server: its own costs must not count against the service.
            send = send_channel.unary_unary(SEND_EVENT)
            requests = [
                pb.SendEventRequest(conversation_id=cid, event=event).SerializeToString()
                for cid in ids
            ]

            def call(index: int, n: int) -> Any:
                return send(requests[index])

            elapsed, latencies = await _workers(concurrency, count, call)
        return _rate(count, elapsed, latencies)

    return run_async(run())


def client_sends(
    owner: str, address: str, concurrency: int, count: int, tag: str
) -> dict[str, float]:
    """Sends through convclient's AsyncConvsvcClient configured with ``address``, each worker
    to its own conversation started on ``owner``: given another node, a routing client learns
    the owner from the first answer and calls it directly from then on."""

    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(owner) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            ids = [f"{tag}-{i}" for i in range(concurrency)]
            for cid in ids:
                await stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))
        async with AsyncConvsvcClient(address=address) as client:
            for cid in ids:  # warm-up (and, through another node, where the owner is)
                await client.send_event(NOTE, conversation_id=cid)

            def call(index: int, n: int) -> Any:
                return client.send_event(NOTE, conversation_id=ids[index])

            elapsed, latencies = await _workers(concurrency, count, call)
        return _rate(count, elapsed, latencies)

    return run_async(run())


def _is_echo(event: pb.Event, content: str) -> bool:
    """Whether ``event`` is the echo agent's answer to the message ``content``."""
    return (
        event.source == "agent"
        and event.name == "message"
        and event.payload.fields["message"].string_value == content
    )


def round_trip(
    address: str, count: int, cid: str = "round-trip", via: str | None = None
) -> dict[str, float]:
    """A user message sent, then its echo received on the conversation's tail; started
    through ``address``, sent and tailed through ``via`` when given."""

    async def run() -> dict[str, float]:
        async with (
            grpc.aio.insecure_channel(address) as owner,
            grpc.aio.insecure_channel(via or address) as channel,
        ):
            await pb_grpc.ConversationServiceStub(owner).StartConversation(
                pb.StartConversationRequest(conversation_id=cid)
            )
            stub = pb_grpc.ConversationServiceStub(channel)
            tail = stub.StreamEvents(pb.StreamEventsRequest(conversation_id=cid)).__aiter__()

            async def echo_of(content: str) -> None:
                while not any(_is_echo(e, content) for e in (await tail.__anext__()).events):
                    pass

            latencies: list[float] = []
            for n in range(count + 20):
                content = f"ping-{n}"
                began = time.perf_counter()
                await stub.SendEvent(
                    pb.SendEventRequest(conversation_id=cid, event=message(content))
                )
                await echo_of(content)
                if n >= 20:  # the first ones warm up
                    latencies.append(time.perf_counter() - began)
        return latency_summary(latencies)

    return run_async(run())


def connect_round_trip(address: str, count: int, cid: str = "connect-trip") -> dict[str, float]:
    """The round trip of ``round_trip`` over one Connect stream: the message sent and its
    echo received on the same bidirectional stream."""

    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.ConversationServiceStub(channel).Connect()
            await call.write(
                pb.ConnectRequest(open=pb.ConnectOpen(conversation_id=cid, connection_id=cid))
            )
            await call.read()  # opened

            async def echo_of(content: str) -> None:
                while not any(_is_echo(e, content) for e in (await call.read()).events.events):
                    pass

            latencies: list[float] = []
            for n in range(count + 20):
                content = f"ping-{n}"
                began = time.perf_counter()
                await call.write(pb.ConnectRequest(send=pb.ConnectSend(event=message(content))))
                await echo_of(content)
                if n >= 20:  # the first ones warm up
                    latencies.append(time.perf_counter() - began)
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass  # the server ends the call once our side is done
        return latency_summary(latencies)

    return run_async(run())


def fsync_latency(directory: Path, count: int) -> dict[str, float]:
    """Appends a 4 KiB page and fsyncs it, ``count`` times, in a file under ``directory``."""
    latencies: list[float] = []
    page = b"\0" * 4096
    with tempfile.NamedTemporaryFile(dir=directory) as file:
        for _ in range(count + 20):
            file.write(page)
            file.flush()
            began = time.perf_counter()
            os.fsync(file.fileno())
            latencies.append(time.perf_counter() - began)
    return latency_summary(latencies[20:])


def write_log(address: str, cid: str, total: int) -> dict[str, float]:
    """Starts conversation ``cid`` with a log of ``total`` events (one start's replay)."""

    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            notes = [
                struct({"source": "user", "action": "bench_note", "args": {"n": n}})
                for n in range(total - 2)
            ]
            began = time.perf_counter()
            await stub.StartConversation(
                pb.StartConversationRequest(conversation_id=cid, replay_events=notes), timeout=600
            )
            elapsed = time.perf_counter() - began
        return {"write_events_per_s": (total - 2) / elapsed}

    return run_async(run())


def catch_up(address: str, cid: str, total: int) -> dict[str, float]:
    """The log written by ``write_log`` tailed from id 0 to its end."""

    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            latest = total - 1  # loading, the notes, then the agent's first state
            received = 0
            # Each batch's events stay undecoded but the last, which says where the tail is.
            tail = channel.unary_stream(
                STREAM_EVENTS,
                request_serializer=pb.StreamEventsRequest.SerializeToString,
                response_deserializer=EventFrames.FromString,
            )
            began = time.perf_counter()
            async for response in tail(pb.StreamEventsRequest(conversation_id=cid)):
                received += len(response.events)
                if response.events and pb.Event.FromString(response.events[-1]).id >= latest:
                    break
            elapsed = time.perf_counter() - began
        return {"events": received, "events_per_s": received / elapsed}

    return run_async(run())


def subscribers(
    address: str, cid: str, start_id: int, streams: int, last_id: int, ready: Any
) -> dict[str, Any]:
    """``streams`` tails of one conversation, each reading from id 0; once every tail has
    caught up to ``start_id - 1`` the process reports ready. Each then waits for event
    ``last_id`` and records every live delivery's delay from the event's commit time."""

    async def run() -> dict[str, Any]:
        delays: list[float] = []
        last_delivery = 0.0
        caught_up = 0
        all_caught_up = asyncio.Event()
        channels = [grpc.aio.insecure_channel(address) for _ in range((streams + 49) // 50)]

        async def consume(index: int) -> None:
            nonlocal last_delivery, caught_up
            stub = pb_grpc.ConversationServiceStub(channels[index % len(channels)])
            call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id=cid))
            waiting = True
            async for response in call:
                now = time.time()
                for event in response.events:
                    if event.id >= start_id:
                        delays.append(now - event.timestamp.ToNanoseconds() / 1e9)
                        last_delivery = max(last_delivery, now)
                    elif waiting and event.id == start_id - 1:
                        waiting = False
                        caught_up += 1
                        if caught_up == streams:
                            all_caught_up.set()
                if response.events and response.events[-1].id >= last_id:
                    call.cancel()
                    return

        try:
            tasks = [asyncio.create_task(consume(n)) for n in range(streams)]
            await asyncio.wait_for(all_caught_up.wait(), 300)
            await asyncio.to_thread(ready.put, streams)
            await asyncio.wait_for(asyncio.gather(*tasks), 600)
        finally:
            for channel in channels:
                await channel.close()
        return {"deliveries": len(delays), "delays": delays, "last_delivery": last_delivery}

    return run_async(run())


def start_many(
    address: str, prefix: str, count: int, concurrency: int, users: int = 0
) -> dict[str, Any]:
    """Starts ``count`` echo conversations (spread over ``users`` users when given); with
    the start rate in each tenth of them, to show whether it falls as the node fills."""

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)

            def call(index: int, n: int) -> Any:
                cid = f"{prefix}-{index}-{n}"
                user = f"user-{(index * count + n) % users}" if users else ""
                return stub.StartConversation(
                    pb.StartConversationRequest(conversation_id=cid, user_id=user)
                )

            finished: list[float] = []
            began = time.perf_counter()
            elapsed, latencies = await _workers(concurrency, count, call, finished)
        return {
            "starts_per_s": count / elapsed,
            "tenths_per_s": _tenths(began, finished),
            **latency_summary(latencies),
        }

    return run_async(run())


def list_user(address: str, user: str, rounds: int) -> dict[str, float]:
    """One user's conversation list (a page of 100), ``rounds`` times."""

    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            latencies: list[float] = []
            listed = 0
            for n in range(rounds + 5):
                began = time.perf_counter()
                response = await stub.ListConversations(
                    pb.ListConversationsRequest(user_id=user, page_size=100)
                )
                if n >= 5:  # warm-up
                    latencies.append(time.perf_counter() - began)
                listed = len(response.conversations)
        return {"listed": listed, **latency_summary(latencies)}

    return run_async(run())


def list_all(address: str, rounds: int, page_size: int) -> dict[str, float]:
    """Pages through every running conversation; also times single pages."""

    async def run() -> dict[str, float]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            full: list[float] = []
            pages: list[float] = []
            listed = 0
            for _ in range(rounds):
                token = ""
                began = time.perf_counter()
                listed = 0
                while True:
                    page_began = time.perf_counter()
                    response = await stub.ListConversations(
                        pb.ListConversationsRequest(page_size=page_size, page_token=token)
                    )
                    pages.append(time.perf_counter() - page_began)
                    listed += len(response.conversations)
                    if not (token := response.next_page_token):
                        break
                full.append(time.perf_counter() - began)
        page = latency_summary(pages)
        return {
            "listed": listed,
            "full_list_p50_ms": latency_summary(full)["p50_ms"],
            "page_p50_ms": page["p50_ms"],
            "page_p99_ms": page["p99_ms"],
        }

    return run_async(run())


def worker_relay(address: str, total: int, batch: int) -> dict[str, float]:
    """A worker that emits ``total`` events as fast as it can, ``batch`` per message; the
    rate is measured at a subscriber of the conversation (every event durable and streamed)."""
    return asyncio.run(_worker_relay(address, total, batch))


async def _worker_relay(address: str, total: int, batch: int) -> dict[str, float]:
    from convsvc.v1 import agent_worker_service_pb2 as wpb
    from convsvc.v1 import agent_worker_service_pb2_grpc as wpb_grpc

    payload = struct({"action": "message", "args": {"content": "x" * 100}, "message": "x" * 100})
    outgoing: asyncio.Queue[Any] = asyncio.Queue()
    outgoing.put_nowait(
        wpb.AttachRequest(
            hello=wpb.WorkerHello(worker_id="relay", agent_kinds=["bench-relay"], capacity=1)
        )
    )

    async def requests() -> Any:
        while (message := await outgoing.get()) is not None:
            yield message

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        call = wpb_grpc.AgentWorkerServiceStub(channel).Attach(requests())
        await call.read()  # welcome
        await stub.StartConversation(
            pb.StartConversationRequest(conversation_id="relay", agent="bench-relay")
        )
        assign = (await call.read()).assign
        next_id = assign.next_event_id
        while next_id:  # the history: convsvc's loading event
            next_id -= len((await call.read()).history.events)
        first = assign.next_event_id
        last = first + total - 1
        began = time.perf_counter()
        for start in range(first, last + 1, batch):
            outgoing.put_nowait(
                wpb.AttachRequest(
                    events=wpb.LoopEvents(
                        conversation_id="relay",
                        assignment=assign.assignment,
                        events=[
                            wpb.WorkerEvent(id=i, source="agent", payload=payload)
                            for i in range(start, min(start + batch, last + 1))
                        ],
                    )
                )
            )
        stream = stub.StreamEvents(
            pb.StreamEventsRequest(conversation_id="relay", start_id=first), timeout=300
        )
        async for response in stream:
            if response.events and response.events[-1].id >= last:
                break
        elapsed = time.perf_counter() - began
        stream.cancel()
        outgoing.put_nowait(None)
        call.cancel()
    return {"events_per_s": total / elapsed, "seconds": elapsed}
