"""Concurrency stress over gRPC: starts, joins, sends, disconnects, closes, limit evictions
and idle cleanup race on few ids, with retried request ids, against a real server.

It found a real race (since fixed): a read on the store's shared reader connection could see
a snapshot older than a commit it had waited for, so a restart of a conversation took an id
its log already held. Several seeds run, because such races show up in some orders only.

Checked afterwards: every log has gap-free ids and a valid sequence of agent states, the
store never failed, health still says SERVING, only expected refusals were answered, no
connection is left on a closed loop, and once stopped no lifecycle task is left pending.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsvc.codec import decode_event
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import error_info, lifecycle_tasks, log_violations

IDS = [f"s{n}" for n in range(5)]
USERS = ["u1", "u2"]
CLIENTS = 12
CALLS_PER_CLIENT = 150
EXPECTED_REFUSALS = {
    "CONVERSATION_NOT_RUNNING",  # a send to a loop that was closed or evicted meanwhile
    "CONVERSATION_NOT_FOUND",  # another user's id, or one never started
    "CONVERSATION_CLOSED",  # a join racing a close
    "CONNECTION_NOT_FOUND",  # a send by a connection that was dropped
    "CONNECTION_ID_TAKEN",  # a join with another user's connection id
}


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


HI = struct({"action": "message", "args": {"content": "hi"}})


@pytest.mark.parametrize("seed", range(6))
async def test_lifecycle_calls_racing_on_few_ids_keep_every_invariant(
    tmp_path: Path, tally, seed: int
) -> None:
    async with running_app(
        tmp_path / "data",
        engine={
            "max_concurrent_conversations": 2,
            "close_delay_seconds": 0.0,
            "cleanup_interval_seconds": 0.01,
        },
    ) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            refusals: list[str] = []

            async def client(number: int) -> None:
                rng = random.Random(seed * 100 + number)
                user = USERS[number % 2]
                for n in range(CALLS_PER_CLIENT):
                    cid = rng.choice(IDS)
                    conn = f"c{rng.randrange(4)}"
                    call = rng.choice(
                        [
                            pb.StartConversationRequest(conversation_id=cid, user_id=user),
                            pb.JoinConversationRequest(
                                conversation_id=cid, connection_id=conn, user_id=user
                            ),
                            pb.SendEventRequest(conversation_id=cid, user_id=user, event=HI),
                            pb.SendEventRequest(connection_id=conn, user_id=user, event=HI),
                            pb.DisconnectConnectionRequest(connection_id=conn, user_id=user),
                            pb.CloseConversationRequest(conversation_id=cid, user_id=user),
                        ]
                    )
                    call.request_id = f"r{number}-{n}"
                    method = getattr(stub, type(call).__name__.removesuffix("Request"))
                    # Half the calls are retried with their request id, as a client would.
                    for _ in range(1 + rng.randrange(2)):
                        try:
                            await method(call)
                            tally.call("stress", "OK")
                        except grpc.aio.AioRpcError as exc:
                            tally.call("stress", exc.code().name)
                            refusals.append(error_info(exc).reason)

            await asyncio.gather(*(client(n) for n in range(CLIENTS)))
            assert set(refusals) <= EXPECTED_REFUSALS, set(refusals) - EXPECTED_REFUSALS
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            for connection in app.engine.queries.list_connections()[0]:
                assert app.engine.queries.runs_here(connection.conversation_id)
            tally.checked("stress: no connection left on a closed loop")
        assert not app.store.failed
        for cid in IDS:
            rows = await app.store.read_events(cid, 0, limit=10**6)
            payloads = [decode_event(row.encoded).payload for row in rows]
            assert log_violations(payloads) == [], cid
            tally.checked("stress: log gap-free with valid agent states")
        tally.checked("stress: store never failed, health SERVING")
        await app.engine.stop()
    assert lifecycle_tasks() == []
    tally.checked("stress: no lifecycle task left pending")
