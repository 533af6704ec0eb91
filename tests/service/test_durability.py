"""Acknowledged events survive SIGKILL; a stream resumes by id across a restart with no
gap and no duplicate; SIGTERM ends streams cleanly; secrets never reach disk or logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from convclient.structs import struct_to_dict
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import echo_of, grpc_events_until, ids


def message(text: str) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"action": "message", "args": {"content": text}})
    return s


async def test_sigkill_mid_traffic_loses_no_acknowledged_event(server_process) -> None:
    server = server_process()
    address = server.start()
    acknowledged: dict[tuple[str, int], str] = {}
    enough = asyncio.Event()
    conversations = [f"conv{n}" for n in range(4)]

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        for cid in conversations:
            await stub.StartConversation(pb.StartConversationRequest(conversation_id=cid))

        async def writer(cid: str) -> None:
            n = 0
            while True:
                text = f"{cid}-{n}"
                try:
                    reply = await stub.SendEvent(
                        pb.SendEventRequest(conversation_id=cid, event=message(text)), timeout=10
                    )
                except grpc.aio.AioRpcError:
                    return  # the server died under us; what was acknowledged is recorded
                acknowledged[(cid, reply.event_id)] = text
                if len(acknowledged) >= 200:
                    enough.set()
                n += 1

        writers = [asyncio.create_task(writer(cid)) for cid in conversations]
        # Let real traffic build up, then kill while appends are in flight.
        await asyncio.wait_for(enough.wait(), 60)
        server.kill()
        await asyncio.gather(*writers)

    assert len(acknowledged) >= 200
    restarted = server_process()
    address = restarted.start()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        for cid in conversations:
            conversation = (
                await stub.GetConversation(pb.GetConversationRequest(conversation_id=cid))
            ).conversation
            assert conversation.status == pb.CONVERSATION_STATUS_STOPPED  # came back stopped
            stored: dict[int, dict] = {}
            token = ""
            while True:
                page = await stub.SearchEvents(
                    pb.SearchEventsRequest(conversation_id=cid, page_size=1000, page_token=token)
                )
                stored.update({e.id: struct_to_dict(e.payload) for e in page.events})
                token = page.next_page_token
                if not token:
                    break
            assert sorted(stored) == list(range(len(stored)))  # no gap
            for (acked_cid, event_id), text in acknowledged.items():
                if acked_cid == cid:
                    assert stored[event_id]["args"]["content"] == text

        # and it can be started again, with its history
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="conv0"))
        await stub.SendEvent(pb.SendEventRequest(conversation_id="conv0", event=message("after")))
        payloads = await grpc_events_until(stub, "conv0", echo_of("after"))
        assert ids(payloads) == list(range(len(payloads)))
    restarted.terminate()


async def test_stream_resumes_across_a_restart_without_gap_or_duplicate(server_process) -> None:
    server = server_process()
    address = server.start()
    received: list[int] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
        await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("before")))
        call = stub.StreamEvents(pb.StreamEventsRequest(conversation_id="c1"), timeout=30)
        async for response in call:
            received.extend(e.id for e in response.events)
            if any(
                struct_to_dict(e.payload).get("message") == "before" and e.source == "agent"
                for e in response.events
            ):
                break
        # SIGTERM: the stream must end with UNAVAILABLE / SHUTTING_DOWN, not hang or reset.
        server.process.send_signal(15)

        async def drain() -> None:
            async for response in call:
                received.extend(e.id for e in response.events)

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await drain()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(ended.value)
        info = error_details_pb2.ErrorInfo()
        assert status is not None and status.details[0].Unpack(info)
        assert info.reason == "SHUTTING_DOWN"
    assert server.process.wait(30) == 0
    assert "server.stopped" in server.logs()

    restarted = server_process()
    address = restarted.start()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1"))
        await stub.SendEvent(pb.SendEventRequest(conversation_id="c1", event=message("after")))
        resumed = await grpc_events_until(stub, "c1", echo_of("after"), start_id=received[-1] + 1)
    everything = received + ids(resumed)
    assert everything == list(range(len(everything)))
    restarted.terminate()


async def test_secrets_in_settings_never_reach_disk_or_logs(server_process, tmp_path: Path) -> None:
    secret = "sk-live-VERY-SECRET-0123456789"
    server = server_process()
    address = server.start()
    settings = struct_pb2.Struct()
    settings.update(
        {
            "llm_model": "gpt-4o",
            "llm_api_key": secret,
            "nested": {"github_token": secret},
            # Secrets under names no deny-list knows (issue 8, item 10):
            "mcp_config": {"stdio_servers": [{"name": "x", "env": {"OPENAI_KEY": secret}}]},
            "database_url": f"postgresql://app:{secret}@db/app",
            "headers": {"Authorization": f"Basic {secret}"},
            "llm_base_url": f"https://user:{secret}@llm.example",
        }
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.JoinConversation(
            pb.JoinConversationRequest(conversation_id="c1", connection_id="s1", settings=settings)
        )
        await stub.SendEvent(pb.SendEventRequest(connection_id="s1", event=message("hi")))
        await grpc_events_until(stub, "c1", echo_of("hi"))
    server.terminate()

    data_dir = tmp_path / "data"
    files = list(data_dir.iterdir())
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path.name
    assert secret not in server.logs()
    records = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    started = [r for r in records if r["event"] == "conversation.started"]
    assert started and started[0]["conversation_id"] == "c1"  # structured, with the id
    assert all("level" in r and "timestamp" in r for r in records)
    with contextlib.closing(sqlite3.connect(data_dir / "convsvc.sqlite3")) as db:
        (stored,) = db.execute("SELECT settings FROM conversations").fetchone()
    assert json.loads(stored) == {"llm_model": "gpt-4o"}  # only the allow-list is kept
