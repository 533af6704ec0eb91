"""The measurements, each against real processes. Sizes come from a Sizes object so that the
smoke test runs the same code at toy size."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc

from benchmarks import adapter as adapter_paths
from benchmarks import floor as floor_service
from benchmarks import load
from benchmarks.processes import Server, convsvc_server, floor_server, in_process
from benchmarks.stats import median_figures, percentile
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    unary_calls: int
    stream_items: int
    sends: int
    round_trips: int
    catch_up_events: int
    subscribers: int
    fan_out_messages: int
    conversations: int
    durable_appends: int
    rounds: int
    agent_rounds: int
    stored_conversations: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(20_000, 200_000, 10_000, 600, 100_000, 1_000, 25, 10_000, 5_000, 3, 7, 1_000_000)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(300, 2_000, 200, 20, 2_000, 20, 3, 200, 200, 1, 1, 2_000)


def calls(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """Unary calls and the round trip, the floors beside convsvc.

    This shared machine drifts by tens of percent within minutes, so the floors and convsvc
    take turns in ``sizes.rounds`` rounds, and each figure is the median over the rounds.
    """
    rounds: list[dict[str, dict[str, float]]] = []
    count = sizes.rounds
    with floor_server() as floor, convsvc_server() as server:
        for n in range(count):
            turns: dict[str, dict[str, float]] = {}
            for concurrency in (1, 16):
                progress(f"floor and send, round {n + 1} of {count}: {concurrency} in flight")
                turns |= _unary_turns(floor, server, concurrency, sizes, f"{n}")
            progress(f"round trip (message -> echo on the tail), round {n + 1} of {count}")
            turns["round_trip"] = in_process(
                load.round_trip, server.address, sizes.round_trips // count, f"rt-{n}"
            )
            progress(f"round trip over one Connect stream, round {n + 1} of {count}")
            turns["connect_round_trip"] = in_process(
                load.connect_round_trip, server.address, sizes.round_trips // count, f"ct-{n}"
            )
            rounds.append(turns)
    merged = {name: median_figures([r[name] for r in rounds]) for name in rounds[0]}
    return {
        "floor": {k: v for k, v in merged.items() if k.startswith(("unary", "durable"))},
        "send": {k: v for k, v in merged.items() if k.startswith(("send", "round", "connect"))},
        "rounds": rounds,
    }


def _unary_turns(
    floor: Server, server: Server, concurrency: int, sizes: Sizes, tag: str
) -> dict[str, dict[str, float]]:
    """The empty call, the durable call and SendEvent, one after the other."""
    calls, sends = sizes.unary_calls // sizes.rounds, sizes.sends // sizes.rounds
    return {
        f"unary_{concurrency}": in_process(load.floor_unary, floor.address, concurrency, calls),
        f"durable_{concurrency}": in_process(
            load.floor_unary, floor.address, concurrency, sends, floor_service.DURABLE
        ),
        f"send_{concurrency}": in_process(
            load.send_events, server.address, concurrency, sends, f"send{concurrency}-{tag}"
        ),
    }


def streams(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """Server streams: the floor's, one item per message and batched, and convsvc's catch-up
    (a tail from id 0 of a stored log), taking turns in rounds like ``calls``."""
    rounds: list[dict[str, dict[str, float]]] = []
    count, total, cid = sizes.rounds, sizes.catch_up_events, "catch-up"
    with floor_server() as floor, convsvc_server() as server:
        progress(f"catch-up: a log of {total:,} events written by one start's replay")
        written = in_process(load.write_log, server.address, cid, total)
        for n in range(count):
            progress(f"floor streams and catch-up, round {n + 1} of {count}")
            rounds.append(
                {
                    "stream_unbatched": in_process(
                        load.floor_stream, floor.address, sizes.stream_items, 1
                    ),
                    "stream_batched": in_process(
                        load.floor_stream, floor.address, sizes.stream_items, 100
                    ),
                    "catch_up": in_process(load.catch_up, server.address, cid, total),
                }
            )
    merged = {name: median_figures([r[name] for r in rounds]) for name in rounds[0]}
    return {
        "floor": {k: v for k, v in merged.items() if k.startswith("stream")},
        "catch_up": merged["catch_up"] | written,
        "rounds": rounds,
    }


def disk_sync(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """What durability costs on this disk: the fsync latency itself, and send and round trip
    again with SQLite's ``synchronous=NORMAL`` (no fsync per commit in WAL mode: safe when the
    process crashes, not when the machine loses power), beside the default ``FULL`` above."""
    progress("disk: fsync latency where the servers keep their data")
    fsync = load.fsync_latency(Path(tempfile.gettempdir()), sizes.round_trips)
    with convsvc_server(sqlite_synchronous="NORMAL") as server:
        progress("send without fsync (synchronous=NORMAL): 1 and 16 in flight, round trip")
        one = in_process(load.send_events, server.address, 1, sizes.sends, "send1")
        sixteen = in_process(load.send_events, server.address, 16, sizes.sends, "send16")
        trip = in_process(load.round_trip, server.address, sizes.round_trips)
    return {
        "fsync": fsync,
        "normal_send_1": one,
        "normal_send_16": sixteen,
        "normal_round_trip": trip,
    }


def _wait_for_event(stub: pb_grpc.ConversationServiceStub, cid: str, event_id: int) -> None:
    call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id=cid), timeout=60)
    for response in call:
        if response.events and response.events[-1].id >= event_id:
            call.cancel()
            return


def fan_out(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    processes = min(4, sizes.subscribers)
    per_process = [sizes.subscribers // processes] * processes
    per_process[0] += sizes.subscribers - sum(per_process)
    cid = "fan-out"
    # Each message: the user's message, running, the echo, awaiting_user_input.
    last_id = 1 + 4 * sizes.fan_out_messages
    with convsvc_server() as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))
        _wait_for_event(stub, cid, 1)  # loading, then awaiting_user_input
        progress(f"fan-out: {sizes.subscribers:,} subscribers in {processes} processes")
        context = get_context("spawn")
        with (
            context.Manager() as manager,
            ProcessPoolExecutor(processes, mp_context=context) as pool,
        ):
            ready = manager.Queue()
            futures = [
                pool.submit(load.subscribers, server.address, cid, 2, streams, last_id, ready)
                for streams in per_process
            ]
            for _ in per_process:
                ready.get(timeout=300)
            progress(f"fan-out: {sizes.fan_out_messages} messages to all of them")
            first_send = time.time()
            for n in range(sizes.fan_out_messages):
                stub.SendEvent(
                    pb.SendEventRequest(conversation_id=cid, event=load.message(f"fan-{n}"))
                )
            results = [future.result() for future in futures]
    deliveries = sum(r["deliveries"] for r in results)
    delays = [d for r in results for d in r["delays"]]
    elapsed = max(r["last_delivery"] for r in results) - first_send
    return {
        "subscribers": sizes.subscribers,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / elapsed,
        "p50_delay_ms": percentile(delays, 0.5) * 1000,
        "p99_delay_ms": percentile(delays, 0.99) * 1000,
    }


def scale(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    with convsvc_server() as server:
        in_process(load.start_many, server.address, "warm", 50, 16)
        before = server.rss_kib()
        progress(f"scale: starting {sizes.conversations:,} echo conversations")
        started = in_process(load.start_many, server.address, "scale", sizes.conversations, 32)
        after = _settled_rss(server)
        progress("scale: listing them")
        listed = in_process(load.list_all, server.address, 5, 1000)
    return {
        "conversations": sizes.conversations,
        "starts_per_s": started["starts_per_s"],
        "start_p99_ms": started["p99_ms"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conversation": (after - before) / sizes.conversations,
        **listed,
    }


def _settled_rss(server: Server) -> int:
    """RSS once the freshly started loops have emitted their first events."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        # A round trip after the starts: the loops' start-up work has been scheduled before it.
        stub.ListConversations(pb.ListConversationsRequest(page_size=1))
    return server.rss_kib()


def durability(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    rates: dict[str, float] = {}
    for label, group_commit in (("group_commit", "true"), ("commit_per_event", "false")):
        with convsvc_server(group_commit=group_commit) as server:
            progress(f"durability: acknowledged appends, {label.replace('_', ' ')}")
            result = in_process(load.send_events, server.address, 16, sizes.durable_appends, label)
            rates[label] = result["calls_per_s"]
    return {
        "group_commit_appends_per_s": rates["group_commit"],
        "commit_per_event_appends_per_s": rates["commit_per_event"],
        "ratio": rates["group_commit"] / rates["commit_per_event"],
    }


def worker_relay(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """Events/s through the worker hop: a worker emitting as fast as it can, batched like the
    catch-up stream, against the catch-up figure (the same events read from the log)."""
    with convsvc_server(workers__kinds='["bench-relay"]') as server:
        progress(f"worker relay: {sizes.catch_up_events:,} events from a worker")
        return in_process(load.worker_relay, server.address, sizes.catch_up_events, 100)


def agents(sizes: Sizes, progress: Progress, releases: dict[str, Path]) -> dict[str, Any]:
    """Real OpenHands agents: OpenHands' web server with its own manager against the same
    server with RemoteConversationManager and a convsvc worker, per OpenHands release."""
    if not releases:
        return {"status": "not measured: no OpenHands venv given (--agents VERSION=PYTHON)"}
    measured = {}
    for version, python in releases.items():
        with convsvc_server(engine__default_agent="openhands") as server:
            progress(f"agents: OpenHands {version}'s web server, its own manager and convsvc's")
            measured[version] = adapter_paths.openhands_agents(
                python, server.address, server.process.pid, sizes.agent_rounds
            )
    return measured


def agent_server(sizes: Sizes, progress: Progress, sdk_python: Path | None) -> dict[str, Any]:
    """OpenHands 1.x: the SDK's RemoteConversation against a stock agent-server and against
    convsvc's agent-server API with an openhands-sdk worker, in the SDK's venv."""
    if sdk_python is None:
        return {"status": "not measured: no SDK venv given (--sdk-python)"}
    progress("agent-server API: a stock agent-server 1.58.2 and convsvc, taking turns")
    return adapter_paths.agent_server_api(sdk_python, sizes.agent_rounds)


def adapter(sizes: Sizes, progress: Progress, openhands_python: Path | None) -> dict[str, Any]:
    if openhands_python is None:
        return {"status": "not measured: no OpenHands venv given (--openhands-python)"}
    progress("adapter: the engine in-process, message -> echo")
    baseline = in_process(adapter_paths.in_process_engine, sizes.round_trips)
    with convsvc_server() as server:
        progress("adapter: RemoteConversationManager over gRPC, message -> relayed oh_event")
        remote = adapter_paths.remote_manager(openhands_python, server.address, sizes.round_trips)
    return {
        "in_process": baseline,
        "remote_manager": remote,
        "p50_ratio": remote["p50_ms"] / baseline["p50_ms"],
        "throughput_ratio": remote["messages_per_s"] / baseline["messages_per_s"],
    }
