"""Connect over a real server: one stream joins, sends, receives and disconnects."""

from __future__ import annotations

import asyncio

import grpc

from convclient.structs import struct_to_dict
from convsvc.v1 import conversation_service_pb2 as pb
from tests.helpers import expect_error
from tests.service.test_grpc_api import message
from tests.service.test_watch import KIND, Watch


def open_request(cid: str, connection_id: str = "", **fields) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        open=pb.ConnectOpen(conversation_id=cid, connection_id=connection_id, **fields)
    )


def send_request(text: str, request_id: str = "") -> pb.ConnectRequest:
    return pb.ConnectRequest(send=pb.ConnectSend(event=message(text), request_id=request_id))


class Session:
    """A Connect call: requests written as the test goes, responses sorted as they come."""

    def __init__(self, stub, opening: pb.ConnectRequest) -> None:
        self.call = stub.Connect()
        self.opening = opening
        self.results: list[pb.ConnectSendResult] = []
        self.payloads: list[dict] = []
        self.opened: pb.ConnectOpened | None = None

    async def open(self) -> pb.ConnectOpened:
        await self.call.write(self.opening)
        response = await asyncio.wait_for(self.call.read(), 10)
        assert response.WhichOneof("response") == "opened", response
        self.opened = response.opened
        return response.opened

    async def read_until(self, done) -> None:
        async with asyncio.timeout(10):
            while not done(self):
                response = await self.call.read()
                assert response is not grpc.aio.EOF, "the stream ended first"
                self._take(response)

    async def read_to_end(self) -> grpc.StatusCode:
        async with asyncio.timeout(10):
            while (response := await self.call.read()) is not grpc.aio.EOF:
                self._take(response)
        return await self.call.code()

    def _take(self, response: pb.ConnectResponse) -> None:
        which = response.WhichOneof("response")
        if which == "send_result":
            self.results.append(response.send_result)
        elif which == "events":
            self.payloads += [struct_to_dict(e.payload) for e in response.events.events]
        else:
            raise AssertionError(f"unexpected {which}")

    def ids(self) -> list[int]:
        return [p["id"] for p in self.payloads]


def echoed(text: str):
    return lambda s: any(
        p.get("source") == "agent" and p.get("message") == text for p in s.payloads
    )


async def connections(stub) -> list[str]:
    listed = await stub.ListConnections(pb.ListConnectionsRequest())
    return [c.connection_id for c in listed.connections]


async def test_one_stream_joins_sends_receives_and_disconnects_at_its_end(stub) -> None:
    session = Session(stub, open_request("c1", "s1", user_id="alice"))
    opened = await session.open()
    assert opened.connection.connection_id == "s1"
    assert opened.conversation.conversation_id == "c1"
    assert await connections(stub) == ["s1"]

    await session.call.write(send_request("hi", "r1"))
    await session.read_until(echoed("hi"))
    [result] = session.results
    assert (result.request_id, result.HasField("failure")) == ("r1", False)
    user_event = next(p for p in session.payloads if p["id"] == result.event_id)
    assert user_event["source"] == "user" and user_event["message"] == "hi"
    # Without start_id only events after the join come: its first id follows the join's.
    assert session.ids()[0] == opened.conversation.latest_event_id + 1
    assert session.ids() == list(range(session.ids()[0], session.ids()[-1] + 1))

    await session.call.write(send_request("bye"))
    await session.call.done_writing()
    assert await session.read_to_end() == grpc.StatusCode.OK
    # Everything its sends appended went out before the end, and the connection is gone.
    assert session.results[-1].event_id in session.ids()
    assert await connections(stub) == []


async def test_a_reconnect_resumes_from_start_id_and_a_retried_send_lands_once(stub) -> None:
    first = Session(stub, open_request("c1", "s1"))
    await first.open()
    await first.call.write(send_request("one", "r1"))
    await first.read_until(echoed("one"))
    last_seen = first.ids()[-1]
    sent_id = first.results[0].event_id
    first.call.cancel()  # the network fails

    again = Session(stub, open_request("c1", "s1", start_id=last_seen + 1))
    await again.open()
    await again.call.write(send_request("one", "r1"))  # the client retries what it sent
    await again.call.write(send_request("two", "r2"))
    await again.read_until(echoed("two"))
    assert again.results[0].event_id == sent_id  # the retry appended nothing
    assert again.ids()[0] == last_seen + 1
    search = await stub.SearchEvents(pb.SearchEventsRequest(conversation_id="c1"))
    messages = [struct_to_dict(e.payload).get("message") for e in search.events]
    assert [m for m in messages if m in ("one", "two")] == ["one", "one", "two", "two"]
    again.call.cancel()


async def test_a_bad_send_is_answered_alone_and_the_stream_goes_on(stub) -> None:
    session = Session(stub, open_request("c1", "s1"))
    await session.open()
    bad = pb.ConnectRequest(send=pb.ConnectSend(request_id="bad"))  # no event at all
    await session.call.write(bad)
    await session.call.write(send_request("fine", "ok"))
    await session.read_until(lambda s: len(s.results) == 2)
    failed, fine = session.results
    assert (failed.request_id, failed.event_id) == ("bad", -1)
    assert (failed.failure.code, failed.failure.reason) == ("INVALID_ARGUMENT", "INVALID_EVENT")
    assert "action" in failed.failure.message
    assert fine.event_id >= 0 and not fine.HasField("failure")
    # A second open is refused the same way.
    await session.call.write(open_request("c2"))
    await session.read_until(lambda s: len(s.results) == 3)
    assert session.results[2].failure.reason == "CONNECT_ALREADY_OPEN"
    session.call.cancel()


async def test_a_stream_must_open_first(stub) -> None:
    call = stub.Connect()
    await call.write(send_request("hi"))
    await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "CONNECT_OPEN_FIRST")

    call = stub.Connect()
    await call.write(open_request("c1", user_id="bad user id"))
    await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID")


async def test_another_users_conversation_is_not_found_through_connect(stub) -> None:
    await stub.StartConversation(pb.StartConversationRequest(conversation_id="c1", user_id="bob"))
    call = stub.Connect()
    await call.write(open_request("c1", user_id="alice"))
    await expect_error(call.read(), grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")


async def test_a_client_that_goes_away_is_disconnected_at_once(stub) -> None:
    watch = Watch(stub)
    await watch.snapshot()
    session = Session(stub, open_request("c1", "s1"))
    await session.open()
    joined = await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED, "c1")
    assert list(joined[-1].watched.connection_ids) == ["s1"]

    session.call.cancel()

    left = await watch.changes_until(KIND.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED, "c1")
    assert list(left[-1].watched.connection_ids) == []
    watch.call.cancel()


async def test_a_reconnect_with_the_same_id_keeps_the_connection_when_the_old_stream_ends(
    stub,
) -> None:
    old = Session(stub, open_request("c1", "s1"))
    await old.open()
    new = Session(stub, open_request("c1", "s1"))
    await new.open()
    old.call.cancel()  # the old stream's end is noticed after the new one opened
    await new.call.write(send_request("still here"))
    await new.read_until(echoed("still here"))
    assert not new.results[0].HasField("failure")
    assert await connections(stub) == ["s1"]
    new.call.cancel()


async def test_many_sends_without_reading_are_all_answered_in_order(stub) -> None:
    session = Session(stub, open_request("c1", "s1"))
    await session.open()
    for n in range(300):  # far more than the server's outbox holds
        await session.call.write(send_request(f"m{n}", f"r{n}"))
    await session.call.done_writing()
    assert await session.read_to_end() == grpc.StatusCode.OK
    assert [r.request_id for r in session.results] == [f"r{n}" for n in range(300)]
    event_ids = [r.event_id for r in session.results]
    assert event_ids == sorted(event_ids) and len(set(event_ids)) == 300
    assert set(event_ids) <= set(session.ids())
