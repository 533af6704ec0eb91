"""The event size limit holds on every path an event enters a log, whatever runs the
conversation: a send (SendEvent and Connect), a start's first message and replayed events,
and what a worker emits. Each too-large event is refused where it enters, with
PAYLOAD_TOO_LARGE, and nothing of it is logged or reaches a worker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.conftest import running_app
from tests.helpers import agent_state_is, error_info, expect_error, grpc_events_until
from tests.workers.conftest import FAST_LIVENESS, ScriptedWorker

LIMIT = 1024 * 1024
TOO_LARGE = {"action": "message", "args": {"content": "x" * (LIMIT // 2 + 1024)}}
"""Within the limit as content, over it once logged (the content appears twice)."""


async def stored(stub: pb_grpc.ConversationServiceStub, cid: str) -> list[dict[str, Any]]:
    page = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id=cid, page_size=1000))
    return [struct_to_dict(e.payload) for e in page.events]


async def connect_send(stub: pb_grpc.ConversationServiceStub, cid: str) -> None:
    """A Connect send answers in the stream: raised here as its status would be."""
    call = stub.Connect()
    await call.write(pb.ConnectRequest(open=pb.ConnectOpen(conversation_id=cid)))
    assert (await call.read()).HasField("opened")
    await call.write(pb.ConnectRequest(send=pb.ConnectSend(event=dict_to_struct(TOO_LARGE))))
    while not (response := await call.read()).HasField("send_result"):
        pass
    call.cancel()
    failure = response.send_result.failure
    assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("agent", ["echo", "worker-echo"])
async def test_no_path_logs_an_event_over_the_limit(tmp_path: Path, agent: str, tally) -> None:
    async with running_app(tmp_path / "data", workers=FAST_LIVENESS) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            worker = ScriptedWorker(channel)
            worker.hello("w")
            await worker.receive("welcome")
            await stub.StartConversation(
                pb.StartConversationRequest(conversation_id="c", agent=agent)
            )
            if agent == "echo":
                # The echo agent's own start events land after Start answers: wait for them,
                # so that "nothing logged" compares against a settled log.
                await grpc_events_until(stub, "c", agent_state_is("awaiting_user_input"))
            before = await stored(stub, "c")
            paths: dict[str, Callable[[], Awaitable[Any]]] = {
                "SendEvent": lambda: stub.SendEvent(
                    pb.SendEventRequest(conversation_id="c", event=dict_to_struct(TOO_LARGE)),
                    timeout=10,
                ),
                "initial_user_message": lambda: stub.StartConversation(
                    pb.StartConversationRequest(
                        conversation_id="new-1",
                        agent=agent,
                        initial_user_message=dict_to_struct(TOO_LARGE),
                    )
                ),
                "replay_events": lambda: stub.StartConversation(
                    pb.StartConversationRequest(
                        conversation_id="new-2",
                        agent=agent,
                        replay_events=[dict_to_struct({**TOO_LARGE, "source": "user"})],
                    )
                ),
            }
            for name, call in paths.items():
                await expect_error(call(), grpc.StatusCode.INVALID_ARGUMENT, "PAYLOAD_TOO_LARGE")
                tally.checked(f"limits: refused where it enters ({name})")
            await connect_send(stub, "c")
            tally.checked("limits: refused where it enters (Connect)")
            assert await stored(stub, "c") == before
            if agent == "worker-echo":
                assign = await worker.receive("assign")
                # A worker's own event over the batch limit detaches it, and is not logged.
                worker.send(
                    wpb.AttachRequest(
                        events=wpb.LoopEvents(
                            conversation_id="c",
                            assignment=assign.assignment,
                            events=[
                                wpb.WorkerEvent(
                                    id=assign.next_event_id,
                                    source="agent",
                                    payload=dict_to_struct(
                                        {"action": "message", "args": {"content": "y" * 3_500_000}}
                                    ),
                                )
                            ],
                        )
                    )
                )
                error = await worker.ended_with()
                assert error_info(error).reason == "PAYLOAD_TOO_LARGE"
                assert await stored(stub, "c") == before
                tally.checked("limits: refused where it enters (worker)")
            worker.close()
