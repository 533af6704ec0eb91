"""A node dies (kill -9) or is paused past its lease: another node takes its conversations
over from the log, nothing acknowledged is lost, and the old owner can write nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import grpc
from google.protobuf.struct_pb2 import Struct

from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb
from tests.cluster.conftest import Cluster, Node
from tests.cluster.traffic import RETRYABLE, Progress, Sender, user_messages, whole_log
from tests.helpers import error_info, log_violations


async def wait_running_elsewhere(node: Node, conversation_id: str, limit: float) -> float:
    """Seconds until the conversation is reported running (through a live node)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            view = (
                await node.stub.GetConversation(
                    pb.GetConversationRequest(conversation_id=conversation_id), timeout=2
                )
            ).conversation
        except grpc.aio.AioRpcError as exc:
            # Until the old owner's lease expires: OWNER_UNREACHABLE when it is dead, the
            # caller's deadline when it is paused.
            if exc.code() not in RETRYABLE:
                raise
        else:
            if view.status == pb.CONVERSATION_STATUS_RUNNING:
                return time.monotonic() - started
        await asyncio.sleep(0.1)  # polling the API: there is no event for "running again"
    raise AssertionError(f"not running again within {limit}s")


class Subscriber:
    """A stream held on one node through everything; records every event id it gets."""

    def __init__(self, node: Node, conversation_id: str) -> None:
        self.ids: list[int] = []
        self._call = node.stub.StreamEvents(
            pb.StreamEventsRequest(conversation_id=conversation_id, user_id="alice")
        )
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self._call:
            self.ids.extend(e.id for e in response.events)

    async def caught_up(self, last_id: int, timeout: float = 20.0) -> None:
        async def reached() -> None:
            while not self.ids or self.ids[-1] < last_id:
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"the stream ended at {self.ids[-1:]}")
                await asyncio.sleep(0.02)  # the reader task appends; nothing else to await

        await asyncio.wait_for(reached(), timeout)

    def cancel(self) -> None:
        self._call.cancel()


async def test_kill_9_of_the_owner_loses_nothing_acknowledged(
    cluster: Callable[..., Cluster],
) -> None:
    group = cluster(3)
    owner, b, c = group.nodes
    await owner.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id="alice")
    )
    subscriber = Subscriber(b, "conv")
    progress = Progress()
    senders = [Sender("conv", [b, c], f"s{n}", progress=progress) for n in range(4)]
    stop = asyncio.Event()
    running = [asyncio.create_task(s.run(stop)) for s in senders]
    await progress.reach(40)  # traffic flows through the owner before the kill
    owner.process.kill()
    killed_at = time.monotonic()
    took = await wait_running_elsewhere(c, "conv", 15.0)
    await progress.reach(progress.count + 80)  # and through the new owner after it
    stop.set()
    await asyncio.gather(*running)
    assert took < 15.0 and time.monotonic() - killed_at < 30

    log = await whole_log(b, "conv")
    assert not log_violations(log), log_violations(log)
    where = user_messages(log)
    for sender in senders:
        for text, event_id in sender.acknowledged.items():
            assert where.get(text) == [event_id], (text, event_id, where.get(text))
    await subscriber.caught_up(len(log) - 1)
    assert await b.metric("convsvc_cluster_followed_conversations") == 1  # for its subscriber
    subscriber.cancel()
    assert subscriber.ids == list(range(len(subscriber.ids)))  # each once, in order, no gap
    # The survivors' metrics tell the story: one took the conversation over, and b (where
    # every send goes first) forwarded sends to the owner of the moment. (c sees sends only
    # when b fails one; with a takeover this fast it may see none.)
    takeovers = [await node.metric("convsvc_cluster_takeovers_total") for node in (b, c)]
    assert sum(takeovers) == 1, takeovers
    assert await b.metric("convsvc_cluster_forwards_total", method="SendEvent") > 0


async def test_a_paused_owner_is_fenced_off_when_it_wakes(
    cluster: Callable[..., Cluster],
) -> None:
    group = cluster(2)
    owner, other = group.nodes
    await owner.stub.StartConversation(
        pb.StartConversationRequest(conversation_id="conv", user_id="alice")
    )
    sender = Sender("conv", [other], "s")
    await sender.send("before")
    assert owner.process.process is not None
    os.kill(owner.process.process.pid, signal.SIGSTOP)
    try:
        # Calls that reach the paused owner wait in its socket until it wakes; with request
        # ids (as retrying clients send them), each first reads the ledger, and the loop
        # may be gone when it looks.
        stuck = [
            asyncio.ensure_future(
                owner.stub.SendEvent(
                    pb.SendEventRequest(
                        conversation_id="conv",
                        user_id="alice",
                        event=struct_for(f"stuck-{n}"),
                        request_id=f"stuck-{n}" if n % 2 else "",
                    ),
                    timeout=30,
                )
            )
            for n in range(6)
        ]
        await wait_running_elsewhere(other, "conv", 15.0)
        await sender.send("after-takeover")
    finally:
        os.kill(owner.process.process.pid, signal.SIGCONT)
    outcomes = await asyncio.gather(*stuck, return_exceptions=True)
    log = await whole_log(other, "conv")
    texts = user_messages(log)
    # The first call the old owner handles finds it still believing it runs the loop: the
    # append is fenced off and the loop dropped. Later ones are forwarded to the new owner.
    assert isinstance(outcomes[0], grpc.aio.AioRpcError), outcomes[0]
    for n, outcome in enumerate(outcomes):
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome.details()
            info = error_info(outcome)
            assert info.reason == "OWNER_MOVED"
            assert info.metadata["owner_address"] == other.address
            assert f"stuck-{n}" not in texts  # the old owner appended nothing
        else:
            assert texts[f"stuck-{n}"] == [outcome.event_id]  # logged once, by the new owner
    assert not log_violations(log), log_violations(log)
    assert texts["before"] == [sender.acknowledged["before"]]
    assert texts["after-takeover"] == [sender.acknowledged["after-takeover"]]
    # Woken, the old owner forwards to the new one rather than writing.
    again = await owner.stub.SendEvent(
        pb.SendEventRequest(conversation_id="conv", user_id="alice", event=struct_for("later"))
    )
    log = await whole_log(other, "conv")
    assert user_messages(log)["later"] == [again.event_id]
    assert not log_violations(log)


def struct_for(text: str) -> Struct:
    return dict_to_struct({"action": "message", "args": {"content": text}})


async def test_a_crashed_owner_is_taken_over_without_waiting_for_its_lease(
    cluster: Callable[..., Cluster],
) -> None:
    """kill -9 closes the owner's sessions with PostgreSQL, and with them its liveness lock:
    a peer takes its conversations over at once. A stopped owner (SIGSTOP) keeps its
    sessions: it is taken over only when its lease runs out, as before."""
    lease = 30.0  # far longer than a takeover from a released lock may take
    group = cluster(3, CONVSVC_CLUSTER__LEASE_TTL_SECONDS=str(lease))
    crashing, stopping, survivor = group.nodes
    for node, cid in ((crashing, "crashes"), (stopping, "stops")):
        await node.stub.StartConversation(
            pb.StartConversationRequest(conversation_id=cid, user_id="alice")
        )
    sender = Sender("crashes", [survivor], "s")
    await sender.send("before")

    assert stopping.process.process is not None
    os.kill(stopping.process.process.pid, signal.SIGSTOP)
    try:
        crashing.process.kill()
        took = await wait_running_elsewhere(survivor, "crashes", lease / 2)
        assert took < lease / 2, took
        await sender.send("after")
        # The stopped owner still holds its lock: its conversation stays its own (counted
        # below: one takeover in all).
    finally:
        os.kill(stopping.process.process.pid, signal.SIGCONT)
    log = await whole_log(survivor, "crashes")
    assert not log_violations(log), log_violations(log)
    assert list(user_messages(log)) == ["before", "after"]
    assert (
        await survivor.metric("convsvc_cluster_takeovers_total")
        + await stopping.metric("convsvc_cluster_takeovers_total")
        == 1
    )
