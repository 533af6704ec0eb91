"""The per-user limit holds across nodes under racing starts; SIGTERM drains a node by handing
its conversations over live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsvc.domain import JsonObject
from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Cluster, Node
from tests.cluster.test_cluster_api import message
from tests.cluster.test_takeover import Subscriber, wait_running_elsewhere
from tests.cluster.traffic import Sender, whole_log
from tests.helpers import error_info, expect_error, log_violations
from tests.postgres import PostgresServer


def agent_states(log: list[JsonObject]) -> list[str]:
    return [
        p["extras"]["agent_state"] for p in log if p.get("observation") == "agent_state_changed"
    ]


async def test_racing_starts_on_different_nodes_never_exceed_the_limit(
    cluster: Callable[..., Cluster],
) -> None:
    group = cluster(3, CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS="2")
    db = await asyncpg.connect(group.dsn)
    most_running = 0
    sampling = True

    async def sample() -> None:
        nonlocal most_running
        while sampling:
            running = await db.fetchval(
                "SELECT count(*) FROM conversations WHERE running AND user_id = 'alice'"
            )
            most_running = max(most_running, running)

    sampler = asyncio.create_task(sample())
    starts = [
        group.nodes[n % 3].stub.StartConversation(
            pb.StartConversationRequest(conversation_id=f"conv-{n}", user_id="alice"),
            timeout=30,
        )
        for n in range(12)
    ]
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    sampling = False
    await sampler
    for outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):  # only after repeated lost races
            assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.details()
            assert error_info(outcome).reason == "TOO_MANY_CONVERSATIONS"
    assert sum(not isinstance(o, Exception) for o in outcomes) >= 2
    assert most_running <= 2
    listed = await group.nodes[1].stub.ListConversations(
        pb.ListConversationsRequest(user_id="alice")
    )
    assert len(listed.conversations) == 2
    running = {c.conversation_id for c in listed.conversations}
    # Every other conversation was stopped properly: its log ends with ``stopped``.
    for n, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            continue
        log = await whole_log(group.nodes[0], f"conv-{n}")
        assert not log_violations(log), log_violations(log)
        states = agent_states(log)
        if f"conv-{n}" not in running and states:
            assert states[-1] == "stopped", (n, states)
    await db.close()


async def test_sigterm_hands_conversations_over_without_stopping_them(
    cluster: Callable[..., Cluster],
) -> None:
    # Leases far longer than the test: a move can only come from the hand-over.
    group = cluster(
        3,
        CONVSVC_CLUSTER__LEASE_TTL_SECONDS="60",
        CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS="10",
    )
    draining, b, c = group.nodes
    cids = [f"conv-{n}" for n in range(4)]
    for cid in cids:
        await draining.stub.StartConversation(
            pb.StartConversationRequest(conversation_id=cid, user_id="alice")
        )
    subscribers = [Subscriber(b, cid) for cid in cids]
    senders = [Sender(cid, [c, b], f"s-{cid}") for cid in cids]
    for sender in senders:
        await sender.send("before")
    began = time.monotonic()
    assert draining.process.terminate() == 0
    for cid in cids:
        await wait_running_elsewhere(c, cid, 10.0)
    assert time.monotonic() - began < 10.0
    for sender in senders:
        await sender.send("after")
    for cid, subscriber, sender in zip(cids, subscribers, senders, strict=True):
        log = await whole_log(b, cid)
        assert not log_violations(log), log_violations(log)
        states = agent_states(log)
        assert "stopped" not in states, states  # handed over, never stopped
        assert states.count("loading") == 2  # one run on the drained node, one after
        await subscriber.caught_up(sender.acknowledged["after"])
        subscriber.cancel()
        assert subscriber.ids == list(range(len(subscriber.ids)))
    assert "conversation.dropped" in draining.logs()


async def test_postgres_crash_makes_nodes_not_serving_until_it_is_back(
    cluster: Callable[..., Cluster], postgres: PostgresServer
) -> None:
    group = cluster(2)
    a, b = group.nodes
    await a.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id="alice")
    )
    sender = Sender("conv", [b, a], "s")
    for n in range(10):
        await sender.send(f"before-{n}")

    async def until_health(node: Node, status: int, timeout: float) -> None:
        """Waits on the health service's Watch stream, as a balancer would."""
        watch = health_pb2_grpc.HealthStub(node.channel).Watch(
            health_pb2.HealthCheckRequest(service="convsvc.v1.ConversationService"),
            timeout=timeout,
        )
        async for reply in watch:
            if reply.status == status:
                watch.cancel()
                return
        raise AssertionError("the health stream ended")

    postgres.crash()
    try:
        for node in (a, b):
            await until_health(node, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        for node in (a, b):  # the owner, and a node that would forward to it
            await expect_error(
                node.stub.SendEvent(
                    pb.SendEventRequest(
                        conversation_id="conv", user_id="alice", event=message("during")
                    ),
                    timeout=10,
                ),
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
    finally:
        postgres.start()
    for node in (a, b):
        await until_health(node, health_pb2.HealthCheckResponse.SERVING, 15)
    for n in range(10):
        await sender.send(f"after-{n}", deadline=30)
    log = await whole_log(a, "conv")
    assert not log_violations(log), log_violations(log)
    texts = {str(p.get("message")): p["id"] for p in log if p.get("source") == "user"}
    for text, event_id in sender.acknowledged.items():
        assert texts[text] == event_id
