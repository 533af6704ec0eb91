"""The clustered mode measured: nodes on one real PostgreSQL beside the same run's floors.

What a 2-core machine can and cannot show: every node, PostgreSQL and the load generators
share the same two cores, so aggregate throughput measures the coordination's cost, not the
scaling a cluster of real machines gets. Ratios to the floors measured in the same run are the
figures to compare.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from benchmarks import load
from benchmarks.processes import Server, convsvc_server, floor_server, in_process, in_processes
from benchmarks.stats import percentile
from convsvc.storage.postgres_schema import migrate
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.postgres import PostgresServer, postgres_server

Progress = Any


@dataclass(frozen=True)
class ClusterSizes:
    sends: int
    round_trips: int
    kills: int
    stored: int
    running: int
    floor_appends: int
    lease_ttl_seconds: float
    rounds: int

    @classmethod
    def full(cls) -> ClusterSizes:
        return cls(6_000, 300, 20, 1_000_000, 100_000, 20_000, 10.0, 3)

    @classmethod
    def quick(cls) -> ClusterSizes:
        return cls(200, 20, 1, 2_000, 200, 500, 3.0, 1)


@contextmanager
def nodes(dsn: str, count: int, **settings: str) -> Iterator[list[Server]]:
    """``count`` convsvc nodes on one database."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(convsvc_server(database_url=dsn, **settings)) for _ in range(count)
        ]


def run(quick: bool, progress: Progress) -> dict[str, Any]:
    sizes = ClusterSizes.quick() if quick else ClusterSizes.full()
    with postgres_server() as postgres:
        results: dict[str, Any] = {}
        progress("cluster: PostgreSQL's floor, fenced appends from a bare asyncpg client")
        results["postgres_floor"] = in_process(
            postgres_floor, postgres.create_database(), sizes.floor_appends
        )
        results |= calls(postgres, sizes, progress)
        results["aggregate"] = aggregate(postgres, sizes, progress)
        results["takeover"] = takeover(postgres, sizes, progress)
        results["scale"] = scale(postgres, sizes, progress)
    return results


# -- PostgreSQL's own floor --------------------------------------------------------------------


def postgres_floor(dsn: str, count: int) -> dict[str, float]:
    """Fenced appends (the epoch check and the INSERT in one statement) as fast as a bare
    asyncpg client commits them: one event per commit at 1 and 16 connections, and 64."""

    async def measure() -> dict[str, float]:
        await migrate(dsn)
        setup = await asyncpg.connect(dsn)
        now = datetime.now(UTC)
        for n in range(16):
            await setup.execute(
                "INSERT INTO conversations (conversation_id, agent, settings, create_time, "
                "last_active_time, running, owner_node, lease_epoch) "
                "VALUES ($1, 'echo', '{}', $2, $2, true, 'floor', 1)",
                f"floor-{n}",
                now,
            )
        await setup.close()
        fenced = (
            "INSERT INTO events (conversation_id, id, encoded) SELECT $1, $2, $3 WHERE EXISTS "
            "(SELECT 1 FROM conversations WHERE conversation_id = $1 AND lease_epoch = 1 "
            "FOR SHARE)"
        )
        figures: dict[str, float] = {}
        payload = b"x" * 200
        for connections in (1, 16):
            pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
            per = count // connections

            async def writer(index: int, pool: asyncpg.Pool = pool, per: int = per) -> None:
                cid = f"floor-{index}"
                async with pool.acquire() as conn:
                    base = int(
                        await conn.fetchval(
                            "SELECT coalesce(max(id), -1) + 1 FROM events "
                            "WHERE conversation_id = $1",
                            cid,
                        )
                    )
                    for n in range(per):
                        await conn.execute(fenced, cid, base + n, payload)

            began = time.perf_counter()
            await asyncio.gather(*(writer(i) for i in range(connections)))
            figures[f"appends_per_s_{connections}"] = (
                per * connections / (time.perf_counter() - began)
            )
            await pool.close()
        conn = await asyncpg.connect(dsn)
        base = int(await conn.fetchval("SELECT coalesce(max(id), -1) + 1 FROM events"))
        batches = max(count // 64, 1)
        began = time.perf_counter()
        for b in range(batches):
            ids = list(range(base + b * 64, base + (b + 1) * 64))
            await conn.execute(
                "INSERT INTO events (conversation_id, id, encoded) "
                "SELECT 'floor-0', i, $2 FROM unnest($1::bigint[]) AS i WHERE EXISTS "
                "(SELECT 1 FROM conversations WHERE conversation_id = 'floor-0' "
                "AND lease_epoch = 1 FOR SHARE)",
                ids,
                payload,
            )
        figures["events_per_s_64_per_commit"] = batches * 64 / (time.perf_counter() - began)
        await conn.close()
        return figures

    return asyncio.run(measure())


# -- send and round trip through the owner and through another node ----------------------------


def calls(postgres: PostgresServer, sizes: ClusterSizes, progress: Progress) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with floor_server() as floor, nodes(postgres.create_database(), 2) as (owner, other):
        progress("cluster: the empty-call floor, 1 and 16 in flight")
        for concurrency in (1, 16):
            figures[f"floor_unary_{concurrency}"] = in_process(
                load.floor_unary, floor.address, concurrency, sizes.sends
            )
        for concurrency in (1, 16):
            progress(f"cluster: send through the owner, {concurrency} in flight")
            figures[f"send_owner_{concurrency}"] = in_process(
                load.send_events, owner.address, concurrency, sizes.sends, f"own{concurrency}"
            )
            progress(f"cluster: send through another node (forwarded), {concurrency} in flight")
            figures[f"send_forwarded_{concurrency}"] = in_process(
                load.send_events,
                owner.address,
                concurrency,
                sizes.sends,
                f"fwd{concurrency}",
                other.address,
            )
        routed: dict[str, list[float]] = {"owner": [], "routing": []}
        for n in range(sizes.rounds):
            progress(
                f"cluster: convclient sending to the owner, then through another node "
                f"(routing), round {n + 1} of {sizes.rounds}"
            )
            for path, address in (("owner", owner.address), ("routing", other.address)):
                routed[path].append(
                    in_process(
                        load.client_sends, owner.address, address, 16, sizes.sends, f"{path}{n}"
                    )["calls_per_s"]
                )
        figures["client_send_16"] = {
            path: {"calls_per_s": statistics.median(rates), "rounds": rates}
            for path, rates in routed.items()
        }
        progress("cluster: round trip through the owner, then through another node")
        figures["round_trip_owner"] = in_process(
            load.round_trip, owner.address, sizes.round_trips, "rt-owner"
        )
        figures["round_trip_forwarded"] = in_process(
            load.round_trip, owner.address, sizes.round_trips, "rt-fwd", other.address
        )
    floor1, floor16 = figures["floor_unary_1"], figures["floor_unary_16"]
    figures["ratios"] = {
        name: figures[name]["calls_per_s"]
        / (floor16 if name.endswith("16") else floor1)["calls_per_s"]
        for name in ("send_owner_1", "send_owner_16", "send_forwarded_1", "send_forwarded_16")
    } | {
        "round_trip_owner_p50": figures["round_trip_owner"]["p50_ms"] / floor1["p50_ms"],
        "round_trip_forwarded_p50": figures["round_trip_forwarded"]["p50_ms"] / floor1["p50_ms"],
        "routing_client_16": statistics.median(
            routing / owner
            for routing, owner in zip(
                figures["client_send_16"]["routing"]["rounds"],
                figures["client_send_16"]["owner"]["rounds"],
                strict=True,
            )
        ),
    }
    return figures


# -- aggregate throughput ------------------------------------------------------------------------


def aggregate(postgres: PostgresServer, sizes: ClusterSizes, progress: Progress) -> dict[str, Any]:
    """Sends at 16 in flight per node, through each node to conversations it owns."""
    figures: dict[str, float] = {}
    with convsvc_server() as single:
        progress("cluster: one SQLite node, send 16 in flight (the figure to beat)")
        figures["sqlite_1_node"] = in_process(
            load.send_events, single.address, 16, sizes.sends, "agg-sqlite"
        )["calls_per_s"]
    for count in (1, 2, 3):
        with nodes(postgres.create_database(), count) as group:
            progress(f"cluster: {count} node(s) on PostgreSQL, send 16 in flight each")
            results = in_processes(
                load.send_events,
                [
                    (node.address, 16, sizes.sends, f"agg{count}-{i}")
                    for i, node in enumerate(group)
                ],
            )
            figures[f"postgres_{count}_nodes"] = sum(r["calls_per_s"] for r in results)
    return figures


# -- takeover after kill -9 -----------------------------------------------------------------------


def takeover(postgres: PostgresServer, sizes: ClusterSizes, progress: Progress) -> dict[str, Any]:
    """Kills the owner of a busy conversation ``kills`` times: seconds until another node
    runs it, and acknowledged events missing from the log afterwards (must be 0)."""
    dsn = postgres.create_database()
    settings = {"cluster__lease_ttl_seconds": str(sizes.lease_ttl_seconds)}
    if sizes.lease_ttl_seconds < 4:
        settings["cluster__heartbeat_interval_seconds"] = "0.5"
    seconds: list[float] = []
    lost = 0
    acknowledged = 0
    with ExitStack() as stack:
        group = [
            stack.enter_context(convsvc_server(database_url=dsn, **settings)) for _ in range(3)
        ]
        for kill in range(sizes.kills):
            progress(f"cluster: takeover {kill + 1} of {sizes.kills} (kill -9 of the owner)")
            owner, *others = group
            cid = f"takeover-{kill}"
            with grpc.insecure_channel(owner.address) as channel:
                pb_grpc.ConversationServiceStub(channel).StartConversation(
                    pb.StartConversationRequest(conversation_id=cid)
                )
            sent = _send_retrying(others, cid, [f"{cid}-before-{n}" for n in range(20)])
            owner.process.kill()
            owner.process.wait()
            killed = time.monotonic()
            seconds.append(_until_running(others[0], cid) - killed)
            sent |= _send_retrying(others, cid, [f"{cid}-after-{n}" for n in range(20)])
            logged = _user_messages(others[0], cid)
            acknowledged += len(sent)
            lost += sum(1 for text, event_id in sent.items() if logged.get(text) != [event_id])
            # A replacement keeps three nodes; the killed one is last in line again.
            group = [*others, stack.enter_context(convsvc_server(database_url=dsn, **settings))]
    return {
        "kills": sizes.kills,
        "lease_ttl_seconds": sizes.lease_ttl_seconds,
        "p50_s": percentile(seconds, 0.5),
        "p99_s": percentile(seconds, 0.99),
        "max_s": max(seconds),
        "acknowledged": acknowledged,
        "lost": lost,
    }


def _send_retrying(group: list[Server], cid: str, texts: list[str]) -> dict[str, int]:
    """Sends each text with a request id through whichever node answers; returns the ids."""
    acknowledged: dict[str, int] = {}
    for text in texts:
        deadline = time.monotonic() + 60
        attempt = 0
        while True:
            node = group[attempt % len(group)]
            attempt += 1
            try:
                with grpc.insecure_channel(node.address) as channel:
                    sent = pb_grpc.ConversationServiceStub(channel).SendEvent(
                        pb.SendEventRequest(
                            conversation_id=cid, event=load.message(text), request_id=text
                        ),
                        timeout=5,
                    )
                acknowledged[text] = sent.event_id
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline or exc.code() not in (  # type: ignore[attr-defined]
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                time.sleep(0.05)  # a retry's back-off
    return acknowledged


def _until_running(node: Server, cid: str) -> float:
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        while True:
            try:
                view = stub.GetConversation(
                    pb.GetConversationRequest(conversation_id=cid), timeout=2
                ).conversation
                if view.status == pb.CONVERSATION_STATUS_RUNNING:
                    return time.monotonic()
            except grpc.RpcError:
                pass  # OWNER_UNREACHABLE until the lease expires
            time.sleep(0.02)  # polling: the takeover has no event a client can wait on


def _user_messages(node: Server, cid: str) -> dict[str, list[int]]:
    where: dict[str, list[int]] = {}
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        token = ""
        while True:
            page = stub.SearchEvents(
                pb.SearchEventsRequest(conversation_id=cid, page_size=1000, page_token=token)
            )
            for event in page.events:
                if event.source == "user" and event.name == "message":
                    text = event.payload.fields["message"].string_value
                    where.setdefault(text, []).append(event.id)
            if not (token := page.next_page_token):
                return where


# -- scale -----------------------------------------------------------------------------------------


def scale(postgres: PostgresServer, sizes: ClusterSizes, progress: Progress) -> dict[str, Any]:
    """``stored`` conversations of other users on file and ``running`` echo loops, on one
    SQLite node and on a 3-node cluster: start rate, memory per loop, and one user's list page
    before and after (it must not grow with other users' conversations)."""
    figures: dict[str, Any] = {}
    with convsvc_server() as single:
        figures["sqlite"] = _scale_one(
            [single],
            lambda: _store_sqlite(_sqlite_path(single), sizes.stored),
            sizes,
            progress,
            "one SQLite node",
        )
    dsn = postgres.create_database()
    with nodes(dsn, 3) as group:
        figures["cluster"] = _scale_one(
            group,
            lambda: asyncio.run(_store_postgres(dsn, sizes.stored)),
            sizes,
            progress,
            "3 nodes on PostgreSQL",
        )
    return figures


def _scale_one(
    group: list[Server], store: Any, sizes: ClusterSizes, progress: Progress, label: str
) -> dict[str, float]:
    with grpc.insecure_channel(group[0].address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        for n in range(3):
            stub.StartConversation(
                pb.StartConversationRequest(conversation_id=f"probe-{n}", user_id="probe")
            )
    before_list = in_process(load.list_user, group[-1].address, "probe", 50)
    progress(f"scale ({label}): storing {sizes.stored:,} conversations of other users")
    began = time.perf_counter()
    store()
    stored_s = time.perf_counter() - began
    rss_before = sum(node.rss_kib() for node in group)
    progress(f"scale ({label}): starting {sizes.running:,} echo loops")
    per_node = sizes.running // len(group)
    started = in_processes(
        load.start_many,
        [(node.address, f"run{i}", per_node, 64, 1000) for i, node in enumerate(group)],
    )
    rss_after = sum(node.rss_kib() for node in group)
    after_list = in_process(load.list_user, group[-1].address, "probe", 50)
    return {
        "stored": sizes.stored,
        "stored_seconds": stored_s,
        "running": per_node * len(group),
        "starts_per_s": sum(r["starts_per_s"] for r in started),
        # The nodes start theirs side by side: a tenth of the cluster's starts is a tenth of
        # each node's.
        "starts_per_s_by_tenth": [
            sum(rates) for rates in zip(*(r["tenths_per_s"] for r in started), strict=True)
        ],
        "kib_per_loop": (rss_after - rss_before) / (per_node * len(group)),
        "user_list_p50_ms_small": before_list["p50_ms"],
        "user_list_p50_ms_at_scale": after_list["p50_ms"],
        "user_list_p99_ms_at_scale": after_list["p99_ms"],
    }


def _sqlite_path(server: Server) -> Path:
    return server.log_path.parent / "data" / "convsvc.sqlite3"


def _stored_rows(count: int) -> Iterator[tuple[str, str, str, str, str]]:
    stamp = datetime.now(UTC).isoformat()
    settings = json.dumps({"agent": "CodeActAgent"})
    for n in range(count):
        yield (f"stored-{n}", f"stored-user-{n % 100_000}", "echo", settings, stamp)


def _store_sqlite(path: Path, count: int) -> None:
    db = sqlite3.connect(path, timeout=60)
    with db:
        db.executemany(
            "INSERT INTO conversations (conversation_id, user_id, agent, settings, create_time, "
            "last_active_time) VALUES (?, ?, ?, ?, ?, ?)",
            ((c, u, a, s, t, t) for c, u, a, s, t in _stored_rows(count)),
        )
    db.close()


async def _store_postgres(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    now = datetime.now(UTC)
    await conn.copy_records_to_table(
        "conversations",
        records=((c, u, a, s, now, now) for c, u, a, s, _ in _stored_rows(count)),
        columns=[
            "conversation_id",
            "user_id",
            "agent",
            "settings",
            "create_time",
            "last_active_time",
        ],
    )
    await conn.execute("ANALYZE conversations")
    await conn.close()
