"""The cluster under network faults, Jepsen-style: clients keep one conversation busy through
every node while a seeded schedule cuts, slows and heals links; afterwards the checker
(history.check) judges everything they were told against the log PostgreSQL holds. Each test
also asserts what a client meets during its fault, and writes a summary of the run to
test-artifacts/partitions/ (the figures in docs/reliability.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import Any

import asyncpg
import grpc

from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.test_cluster_workers import advertised
from tests.partitions.conftest import ARTIFACTS, LAB_CLUSTER, LabCluster, LabNode
from tests.partitions.history import History, Operation, check
from tests.partitions.workload import USER, Workload, stored_log

LEASE = float(LAB_CLUSTER["CONVSVC_CLUSTER__LEASE_TTL_SECONDS"])


async def start(group: LabCluster, nodes: int = 3) -> tuple[list[LabNode], Workload]:
    started = group.start_nodes(nodes)
    await started[0].stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id=USER), timeout=30
    )
    work = Workload("conv", started)
    group.clients.append(work.cancel)
    work.start()
    await work.acknowledged(20)
    return started, work


async def owner_address(dsn: str) -> str | None:
    db = await asyncpg.connect(dsn)
    try:
        return await db.fetchval(
            "SELECT owner_address FROM conversations WHERE conversation_id = 'conv'"
        )
    finally:
        await db.close()


async def finish(
    group: LabCluster,
    work: Workload,
    name: str,
    seed: int,
    schedule: list[str],
    fault_at: float | None = None,
) -> History:
    """Stops the clients, checks the history against the stored log, saves the summary."""
    await work.acknowledged(10)  # healed: the cluster makes progress again
    await work.stop()
    log = await stored_log(group.dsn, "conv")
    problems = check(work.history, log)
    summary: dict[str, Any] = {
        "test": name,
        "seed": seed,
        "schedule": schedule,
        "operations": len(work.history.operations),
        "outcomes": work.history.outcomes(),
        "errors": work.history.errors(),
        "events_in_log": len(log),
        "streams_read": len(work.history.streams),
        "epochs": sorted({row.epoch for row in log if row.epoch is not None}),
        "first_acknowledgement_after_the_fault_seconds": (
            round(first_ack_after(work.history, fault_at) - fault_at, 2)
            if fault_at is not None
            else None
        ),
        "violations": problems,
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(summary, indent=2))
    (ARTIFACTS / f"{name}.log.jsonl").write_text(
        "".join(json.dumps(dataclasses.asdict(row)) + "\n" for row in log)
    )
    (ARTIFACTS / f"{name}.history.jsonl").write_text(
        "".join(json.dumps(dataclasses.asdict(op)) + "\n" for op in work.history.operations)
    )
    print(json.dumps(summary, indent=2))
    assert not problems, problems
    return work.history


def first_ack_after(history: History, moment: float) -> float:
    """When the first send invoked after ``moment`` was acknowledged."""
    return min(
        op.completed for op in history.operations if op.outcome == "ok" and op.invoked > moment
    )


def through(history: History, node: LabNode, start: float, end: float) -> list[Operation]:
    """Sends made through ``node`` that were answered between ``start`` and ``end``."""
    return [
        op
        for op in history.operations
        if op.node == node.name and start <= op.completed <= end and op.client != "probe"
    ]


async def test_the_owner_cut_off_from_postgres_stops_acknowledging_and_its_conversation_moves(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    rng = random.Random(seed)
    (a, b, c), work = await start(group)
    assert await owner_address(group.dsn) == a.address
    outage = rng.uniform(2.5, 3.0) * LEASE

    group.lab.cut(a.host, group.database_host)
    cut_at = time.monotonic()
    await work.acknowledged(20, timeout=4 * LEASE)  # the conversation moved: progress
    await asyncio.sleep(cut_at + outage - time.monotonic())  # the schedule, not a wait
    moved_to = await owner_address(group.dsn)
    group.lab.heal()
    healed_at = time.monotonic()
    history = await finish(
        group, work, "owner-cut-from-postgres", seed,
        [f"cut n1 (owner) from postgres for {outage:.1f}s"], cut_at,
    )  # fmt: skip

    assert moved_to in (b.address, c.address)
    # The old owner acknowledged nothing it could not commit (the checker), and nothing at
    # all once cut off; what it answered said the outcome was unknown (retry), and once
    # its lease had run out, that the database is out of its reach.
    from_a = through(history, a, cut_at + 0.5, healed_at)
    assert not [op for op in from_a if op.outcome == "ok"]
    assert {op.code for op in from_a} <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    late = [op for op in from_a if op.invoked > cut_at + 2 * LEASE]
    assert ("UNAVAILABLE", "DATABASE_UNAVAILABLE") in {(op.code, op.reason) for op in late}
    # Nodes whose database was fine never said it was not.
    others = through(history, b, cut_at, healed_at) + through(history, c, cut_at, healed_at)
    assert not [op for op in others if op.reason == "DATABASE_UNAVAILABLE"]
    # Acknowledgements resumed within the lease (and a scan) of the cut.
    # The lease, a takeover scan, the restore from the log, and the clients' attempts that
    # were waiting on the cut-off owner until then (3 s deadlines).
    assert first_ack_after(history, cut_at) - cut_at < LEASE + 4.0


async def audited(dsn: str, request_ids: set[str], timeout: float = 20.0) -> int:
    """How many of ``request_ids`` have an audit entry of a failed call, once all have (or
    the timeout passed): entries held through an outage are stored once it ends."""
    db = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(timeout):
            while True:
                found = await db.fetchval(
                    "SELECT count(DISTINCT request_id) FROM audit "
                    "WHERE request_id = ANY($1::text[]) AND code <> 'OK'",
                    sorted(request_ids),
                )
                if found >= len(request_ids):
                    return int(found)
                await asyncio.sleep(0.2)  # the audit log is a table: nothing to subscribe to
    finally:
        await db.close()


async def test_calls_refused_during_a_database_outage_are_audited_once_it_ends(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    (a, _, _), work = await start(group)
    group.lab.cut(a.host, group.database_host)
    cut_at = time.monotonic()
    await work.acknowledged(20, timeout=4 * LEASE)
    await asyncio.sleep(cut_at + 2 * LEASE - time.monotonic())  # the schedule
    group.lab.heal()
    healed_at = time.monotonic()
    history = await finish(
        group, work, "audit-through-outage", seed, ["cut n1 from postgres"], cut_at
    )
    # Calls the cut-off node failed (refused, or gave up on at their deadline) while it
    # could store nothing: each is in the audit log once the database is back.
    refused = {
        op.text
        for op in through(history, a, cut_at + 0.5, healed_at)
        if op.outcome != "ok" and op.invoked > cut_at
    }
    assert refused
    assert await audited(group.dsn, refused) == len(refused)


async def test_an_owner_cut_off_from_its_peers_keeps_its_conversation_and_forwards_fail_fast(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    rng = random.Random(seed)
    (a, b, c), work = await start(group)
    duration = rng.uniform(2.0, 3.0) * LEASE
    group.lab.cut(a.host, b.host)
    group.lab.cut(a.host, c.host)
    cut_at = time.monotonic()
    await work.acknowledged(20, timeout=4 * LEASE)  # through the owner itself
    await asyncio.sleep(cut_at + duration - time.monotonic())  # the schedule
    owner_during = await owner_address(group.dsn)
    group.lab.heal()
    healed_at = time.monotonic()
    history = await finish(
        group,
        work,
        "owner-cut-from-peers",
        seed,
        [f"cut n1 (owner) from n2, n3 for {duration:.1f}s"],
        cut_at,
    )
    assert owner_during == a.address  # it kept its lease: nothing moved, nothing split
    # Clients that reach the owner go on: those pinned to it, and the routing client,
    # which learnt the owner's address from a forwarded answer and calls it directly.
    during = [op for op in through(history, a, cut_at, healed_at) if op.outcome == "ok"]
    assert {"p0", "o0"} <= {op.client for op in during}
    # Once the peers' keepalive noticed (two intervals), calls forwarded to the owner failed
    # at once, naming the owner, instead of waiting out their deadline.
    noticed = cut_at + 3.0
    forwarded = [
        op
        for node in (b, c)
        for op in through(history, node, noticed, healed_at)
        if op.invoked > noticed
    ]
    assert forwarded
    assert {(op.code, op.reason) for op in forwarded} == {("UNAVAILABLE", "OWNER_UNREACHABLE")}
    assert all(op.completed - op.invoked < 1.5 for op in forwarded)
    assert all(a.address in op.details for op in forwarded)


async def test_a_node_cut_off_from_everything_loses_its_conversation_and_rejoins_when_healed(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    rng = random.Random(seed)
    (a, b, c), work = await start(group)
    duration = rng.uniform(2.0, 3.0) * LEASE
    group.lab.isolate(a.host)
    cut_at = time.monotonic()
    await work.acknowledged(20, timeout=4 * LEASE)
    await asyncio.sleep(cut_at + duration - time.monotonic())  # the schedule
    assert await owner_address(group.dsn) in (b.address, c.address)
    group.lab.heal()
    history = await finish(
        group, work, "node-isolated", seed, [f"isolate n1 (owner) for {duration:.1f}s"], cut_at
    )
    assert first_ack_after(history, cut_at) - cut_at < LEASE + 4.0  # as above
    # Healed, the old owner serves again (forwarding to the new owner).
    sent = await a.stub.SendEvent(
        pb.SendEventRequest(
            conversation_id="conv",
            user_id=USER,
            event=dict_to_struct({"action": "message", "args": {"content": "after"}}),
        ),
        timeout=10,
    )
    log = await stored_log(group.dsn, "conv")
    assert [row.id for row in log if row.payload.get("message") == "after"][:1] == [sent.event_id]


async def test_a_flapping_link_between_the_owner_and_postgres_loses_nothing(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    rng = random.Random(seed)
    (a, _, _), work = await start(group)
    schedule: list[str] = []
    ends = time.monotonic() + 3 * LEASE
    while time.monotonic() < ends:
        down, up = rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4)
        schedule.append(f"down {down:.2f}s, up {up:.2f}s")
        group.lab.cut(a.host, group.database_host)
        await asyncio.sleep(down)  # the schedule
        group.lab.mend(a.host, group.database_host)
        await asyncio.sleep(up)  # the schedule
    await finish(group, work, "flapping-link", seed, schedule)


async def test_a_slow_lossy_link_to_postgres_loses_nothing(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    slow = group.slow_link_dsn(delay=0.1, loss=0.05, seed=seed)
    # The default lease: heartbeats take several slow round trips.
    nodes = group.start_nodes(
        3,
        dsn=slow,
        CONVSVC_CLUSTER__LEASE_TTL_SECONDS="10",
        CONVSVC_CLUSTER__HEARTBEAT_INTERVAL_SECONDS="2",
    )
    for attempt in range(10):  # as a client does: UNAVAILABLE is retried
        try:
            await nodes[0].stub.StartConversation(
                pb.StartConversationRequest(conversation_id="conv", user_id=USER, request_id="s"),
                timeout=30,
            )
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 9:
                raise
    work = Workload("conv", nodes, deadline=10.0)
    group.clients.append(work.cancel)
    work.start()
    await work.acknowledged(50, timeout=120)
    history = await finish(
        group, work, "slow-lossy-link", seed, ["every node: 100 ms each way, 5 % loss"]
    )
    assert history.outcomes().get("ok", 0) >= 60


async def test_postgres_restarted_mid_traffic_loses_nothing_and_takes_no_node_for_crashed(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    rng = random.Random(seed)
    _, work = await start(group)
    down = rng.uniform(0.5, 1.5)
    group.postgres.stop()
    await asyncio.sleep(down)  # the schedule
    group.postgres.start()
    await work.acknowledged(20, timeout=4 * LEASE)
    await finish(group, work, "postgres-restart", seed, [f"postgres down {down:.1f}s"])
    # Every liveness lock went with the restart; no node may take another for crashed
    # (a lease that ran out while the database was away is another matter: it moves).
    assert not [node.name for node in group.nodes if "cluster.node_crashed" in node.logs()]


WORKER_SETTINGS = {
    "CONVSVC_WORKERS__KINDS": '["worker-echo"]',
    "CONVSVC_WORKERS__PING_INTERVAL_SECONDS": "0.2",
    "CONVSVC_WORKERS__SILENCE_TIMEOUT_SECONDS": "2",
}


async def test_a_partitioned_node_s_worker_conversation_continues_on_another_node_s_worker(
    lab_cluster: LabCluster, seed: int
) -> None:
    group = lab_cluster
    rng = random.Random(seed)
    a, b, c = group.start_nodes(3, **WORKER_SETTINGS)
    group.start_worker(a, "wa")
    group.start_worker(b, "wb")
    await advertised(group.dsn, a.address, "worker-echo")
    await advertised(group.dsn, b.address, "worker-echo")
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id=USER, agent="worker-echo"),
        timeout=30,
    )
    assert await owner_address(group.dsn) == a.address
    work = Workload("conv", [a, b, c])
    group.clients.append(work.cancel)
    work.start()
    await work.acknowledged(20)
    duration = rng.uniform(2.0, 3.0) * LEASE
    group.lab.isolate(a.host)  # the node and its worker, cut off together
    cut_at = time.monotonic()
    await work.acknowledged(20, timeout=6 * LEASE)
    await asyncio.sleep(cut_at + duration - time.monotonic())  # the schedule
    assert await owner_address(group.dsn) == b.address  # where a worker has room
    group.lab.heal()
    await finish(
        group,
        work,
        "worker-node-isolated",
        seed,
        [f"isolate n1 and its worker for {duration:.1f}s"],
        cut_at,
    )
