"""Agent workers in a cluster: a worker attaches to one node, conversations of its kind start
where a worker has room, and a drained node's conversation is restored by a worker of the
node that takes it over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Cluster
from tests.cluster.test_cluster_api import message
from tests.cluster.test_takeover import wait_running_elsewhere
from tests.helpers import echo_of, grpc_events_until, log_violations
from tests.workers.conftest import WorkerProcess

WORKER_SETTINGS = {
    "CONVSVC_WORKERS__KINDS": '["worker-echo"]',
    "CONVSVC_WORKERS__PING_INTERVAL_SECONDS": "0.2",
    "CONVSVC_WORKERS__SILENCE_TIMEOUT_SECONDS": "2",
    "CONVSVC_CLUSTER__LEASE_TTL_SECONDS": "60",
}


async def advertised(dsn: str, address: str, kind: str, timeout: float = 30.0) -> None:
    """Waits until a node's heartbeat says its workers have room for ``kind``."""
    db = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(timeout):
            query = "SELECT $2 = ANY(agent_kinds) FROM nodes WHERE address = $1"
            while True:
                if await db.fetchval(query, address, kind):
                    return
                await asyncio.sleep(0.1)  # the registry is a table: nothing to subscribe to
    finally:
        await db.close()


async def owner_of(dsn: str, cid: str) -> str:
    db = await asyncpg.connect(dsn)
    try:
        return str(
            await db.fetchval(
                "SELECT owner_address FROM conversations WHERE conversation_id = $1", cid
            )
        )
    finally:
        await db.close()


async def test_worker_conversations_start_where_a_worker_has_room_and_survive_a_drain(
    cluster: Callable[..., Cluster], start_worker: Callable[..., WorkerProcess]
) -> None:
    group = cluster(2, **WORKER_SETTINGS)
    with_worker, without = group.nodes
    start_worker(with_worker.address, "w1")
    await advertised(group.dsn, with_worker.address, "worker-echo")

    # Started through the node without a worker: it runs where the worker is.
    await without.stub.StartConversation(
        pb.StartConversationRequest(
            conversation_id="conv",
            user_id="alice",
            agent="worker-echo",
            initial_user_message=message("first"),
        )
    )
    assert await owner_of(group.dsn, "conv") == with_worker.address
    await grpc_events_until(without.stub, "conv", echo_of("first"), user_id="alice", timeout=30)

    # A worker for the other node; then the first node drains.
    start_worker(without.address, "w2")
    await advertised(group.dsn, without.address, "worker-echo")
    assert with_worker.process.terminate() == 0
    await wait_running_elsewhere(without, "conv", 20.0)
    assert await owner_of(group.dsn, "conv") == without.address
    await without.stub.SendEvent(
        pb.SendEventRequest(conversation_id="conv", user_id="alice", event=message("second")),
        timeout=30,
    )
    payloads = await grpc_events_until(
        without.stub, "conv", echo_of("second"), user_id="alice", timeout=30
    )
    assert not log_violations(payloads), log_violations(payloads)
    texts = [p["args"]["content"] for p in payloads if p.get("source") == "user"]
    assert texts == ["first", "second"]  # the new worker restored the log, then went on
