"""A node that learns it was fenced off answers the calls that waited on it as if they had
reached the new owner: forwarded there, never CONVERSATION_NOT_RUNNING for a conversation
that runs (on another node).

Two nodes in this process on one real PostgreSQL, each with a scripted agent worker. Node A
runs a worker conversation whose worker holds two sends undelivered; node B takes the
conversation over (A looks dead: its heartbeat is made to lapse); A's worker then writes and
is fenced, A drops the loop, and the two sends that waited on A must reach B.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.app import ConvsvcApp
from convsvc.config import Settings
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.workers.conftest import FAST_LIVENESS, ScriptedWorker


def node(root: Path, name: str, dsn: str, heartbeat: float) -> ConvsvcApp:
    return ConvsvcApp(
        Settings(
            listen="127.0.0.1:0",
            data_dir=root / name,
            use_uvloop=False,
            database_url=dsn,
            workers=FAST_LIVENESS,
            cluster={
                "heartbeat_interval_seconds": heartbeat,
                "lease_ttl_seconds": max(3.0, heartbeat * 2),
                "takeover_scan_seconds": 0.2,
            },
        )
    )


def logged(cid: str, assignment: int, event_id: int, deliver: Any) -> wpb.AttachRequest:
    return wpb.AttachRequest(
        events=wpb.LoopEvents(
            conversation_id=cid,
            assignment=assignment,
            events=[
                wpb.WorkerEvent(
                    id=event_id,
                    source="user",
                    payload=deliver.payload,
                    delivery_id=deliver.delivery_id,
                )
            ],
        )
    )


async def test_sends_waiting_on_a_fenced_owner_reach_the_new_owner(
    postgres_dsn: str, tmp_path: Path
) -> None:
    # A's heartbeat is slow: once marked dead it stays so while B takes over.
    a = node(tmp_path, "a", postgres_dsn, heartbeat=60.0)
    b = node(tmp_path, "b", postgres_dsn, heartbeat=0.5)
    await a.start()
    await b.start()
    assert a.server is not None and b.server is not None and a.postgres is not None
    try:
        async with (
            grpc.aio.insecure_channel(a.server.address) as to_a,
            grpc.aio.insecure_channel(b.server.address) as to_b,
        ):
            worker_a, worker_b = ScriptedWorker(to_a), ScriptedWorker(to_b)
            worker_a.hello("wa")
            worker_b.hello("wb")
            await worker_a.receive("welcome")
            await worker_b.receive("welcome")
            stub_a = pb_grpc.ConversationServiceStub(to_a)
            await stub_a.StartConversation(
                pb.StartConversationRequest(conversation_id="c", agent="worker-echo")
            )
            assign = await worker_a.receive("assign")
            await worker_a.receive("history")
            sends = [
                asyncio.ensure_future(
                    stub_a.SendEvent(
                        pb.SendEventRequest(
                            conversation_id="c",
                            event=dict_to_struct(
                                {"action": "message", "args": {"content": f"waiting-{n}"}}
                            ),
                        ),
                        timeout=30,
                    )
                )
                for n in range(2)
            ]
            for _ in sends:  # delivered to A's worker, which does not log them yet
                await worker_a.receive("deliver")

            # A looks dead; B claims the conversation (a new epoch) and its worker gets it.
            await PostgresDirectory(a.postgres).leave_cluster()
            taken = await worker_b.receive("assign", timeout=20)
            await worker_b.receive("history")

            # A's worker writes: the append is fenced, A drops the loop, and the sends that
            # waited on A are answered by B, whose worker logs them.
            worker_a.send(
                wpb.AttachRequest(
                    events=wpb.LoopEvents(
                        conversation_id="c",
                        assignment=assign.assignment,
                        events=[
                            wpb.WorkerEvent(
                                id=assign.next_event_id,
                                source="environment",
                                payload=dict_to_struct(
                                    {
                                        "observation": "agent_state_changed",
                                        "content": "",
                                        "extras": {"agent_state": "awaiting_user_input"},
                                    }
                                ),
                            )
                        ],
                    )
                )
            )
            next_id = taken.next_event_id
            for _ in sends:
                deliver = await worker_b.receive("deliver", timeout=20)
                worker_b.send(logged("c", taken.assignment, next_id, deliver))
                next_id += 1
            answers = await asyncio.gather(*sends)
            assert sorted(answer.event_id for answer in answers) == [
                taken.next_event_id,
                taken.next_event_id + 1,
            ]
            page = await pb_grpc.ConversationServiceStub(to_b).SearchEvents(
                pb.SearchEventsRequest(conversation_id="c", page_size=100)
            )
            contents = [
                struct_to_dict(e.payload).get("args", {}).get("content") for e in page.events
            ]
            assert sorted(c for c in contents if c) == ["waiting-0", "waiting-1"]  # once each
            worker_a.close()
            worker_b.close()
    finally:
        await a.stop()
        await b.stop()
