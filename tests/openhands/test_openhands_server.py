"""OpenHands' own web server with RemoteConversationManager, driven as its frontend does:
REST for settings and conversations, socket.io for events."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from convclient import AsyncConvsvcClient
from tests.openhands.browser import EVENT_TIMEOUT, Browser
from tests.openhands.conftest import LLM_KEY, Convsvc, OpenHandsServer


def echo_of(content: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(
        e.get("source") == "agent" and e.get("action") == "message" and e.get("message") == content
        for e in events
    )


@pytest.fixture
async def rest(openhands: OpenHandsServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=openhands.url, timeout=EVENT_TIMEOUT) as client:
        response = await client.post(
            "/api/settings",
            json={"llm_model": "openai/gpt-4o", "llm_api_key": LLM_KEY, "agent": "CodeActAgent"},
        )
        assert response.status_code == 200, response.text
        yield client


def agent_state_now(state: str) -> Callable[[list[dict[str, Any]]], bool]:
    """True once the latest agent state change received is ``state``."""

    def done(events: list[dict[str, Any]]) -> bool:
        states = [e for e in events if e.get("observation") == "agent_state_changed"]
        return bool(states) and states[-1].get("extras", {}).get("agent_state") == state

    return done


async def one_conversation_in_two_browsers(
    first: OpenHandsServer, second: OpenHandsServer
) -> tuple[str, Browser, Browser]:
    """A conversation started through ``first`` with the message "one", open in a browser
    on each web server, both having seen its echo."""
    async with httpx.AsyncClient(base_url=first.url, timeout=EVENT_TIMEOUT) as rest:
        settings = {"llm_model": "openai/gpt-4o", "llm_api_key": LLM_KEY, "agent": "CodeActAgent"}
        assert (await rest.post("/api/settings", json=settings)).status_code == 200
        conversation_id = await new_conversation(rest, "one")
    on_first, on_second = Browser(first), Browser(second)
    await on_first.connect(conversation_id)
    await on_second.connect(conversation_id)
    await on_first.until(echo_of("one"))
    await on_second.until(echo_of("one"))
    return conversation_id, on_first, on_second


async def settled_after(client: AsyncConvsvcClient, conversation_id: str, event_id: int) -> None:
    """Waits on the conversation's stream until the agent awaits input after ``event_id``."""

    async def settled() -> None:
        async for batch in client.tail_events(conversation_id, start_id=event_id + 1):
            for event in batch.events:
                if event.payload.get("extras", {}).get("agent_state") == "awaiting_user_input":
                    return

    await asyncio.wait_for(settled(), EVENT_TIMEOUT)


async def new_conversation(rest: httpx.AsyncClient, message: str) -> str:
    response = await rest.post("/api/conversations", json={"initial_user_msg": message})
    assert response.status_code == 200, response.text
    conversation_id: str = response.json()["conversation_id"]
    return conversation_id


async def test_a_conversation_through_openhands(
    openhands: OpenHandsServer, rest: httpx.AsyncClient, convsvc: Convsvc
) -> None:
    conversation_id = await new_conversation(rest, "hello from the browser")

    browser = Browser(openhands)
    await browser.connect(conversation_id)
    await browser.until(echo_of("hello from the browser"))
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        [connection] = [
            c async for c in client.iter_connections(conversation_ids=[conversation_id])
        ]
        # Held under the web process's instance id, whose heartbeats keep it alive.
        assert connection.client_instance_id.startswith("openhands-")
        assert (await client.heartbeat(connection.client_instance_id)).connection_count == 1
    await browser.say("second message")
    await browser.until(echo_of("second message"))
    first_ids = browser.ids()
    assert len(first_ids) == len(set(first_ids)), f"duplicates: {first_ids}"
    last_seen = max(first_ids)
    await browser.close()

    # Events the browser misses while away, sent straight to the service.
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        sent = await client.send_event(
            {"action": "message", "args": {"content": "while you were away"}},
            conversation_id=conversation_id,
        )
        # The browser comes back once the agent has answered and waits again, so that what
        # it is sent is the replay alone.
        await settled_after(client, conversation_id, sent.event_id)
    again = Browser(openhands)
    await again.connect(conversation_id, latest_event_id=last_seen)
    awaiting = agent_state_now("awaiting_user_input")
    await again.until(lambda events: echo_of("while you were away")(events) and awaiting(events))
    missed = again.ids()
    assert len(missed) == len(set(missed)), f"duplicates: {missed}"
    assert min(missed) > last_seen
    # The replay follows OpenHands' rules: every missed event but agent state changes, then
    # the latest agent state.
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        later = [e async for e in client.iter_events(conversation_id, start_id=last_seen + 1)]
    not_states = [e.id for e in later if e.name != "agent_state_changed"]
    assert [i for i in missed if i in not_states] == not_states
    # Of the missed state changes (running, then awaiting_user_input) only the latest came,
    # after every other missed event.
    states = [e for e in again.events if e.get("observation") == "agent_state_changed"]
    assert [s["extras"]["agent_state"] for s in states] == ["awaiting_user_input"]
    assert again.ids()[-1] == states[0]["id"]

    info = (await rest.get(f"/api/conversations/{conversation_id}")).json()
    assert info["status"] == "RUNNING"
    listed = (await rest.get("/api/conversations")).json()
    assert conversation_id in [c["conversation_id"] for c in listed["results"]]

    await again.close()
    deleted = await rest.delete(f"/api/conversations/{conversation_id}")
    assert deleted.status_code == 200, deleted.text
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        assert (await client.get_conversation(conversation_id)).status.value == "STOPPED"

    assert LLM_KEY.encode() not in convsvc.stored_and_logged_bytes()


async def test_a_service_restart_loses_no_event_at_the_browser(
    openhands: OpenHandsServer, rest: httpx.AsyncClient, convsvc: Convsvc
) -> None:
    conversation_id = await new_conversation(rest, "before the restart")
    browser = Browser(openhands)
    await browser.connect(conversation_id)
    await browser.until(echo_of("before the restart"))

    await asyncio.to_thread(convsvc.restart, signal.SIGKILL)
    await browser.say("after the restart")
    try:
        await browser.until(echo_of("after the restart"))
    except TimeoutError:
        # Seen once under heavy load and not explained: keep what both sides logged.
        raise AssertionError(
            f"no echo after the restart; the browser saw {browser.ids()}\n"
            f"--- OpenHands:\n{openhands.log()[-6000:]}\n"
            f"--- convsvc:\n{convsvc.log_path.read_text(errors='replace')[-6000:]}"
        ) from None
    ids = browser.ids()
    assert len(ids) == len(set(ids)), f"duplicates: {ids}"
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        stored = [e async for e in client.iter_events(conversation_id)]
    # Every stored event a browser is shown (OpenHands' rules) reached it, in order.
    shown = [e.id for e in stored if e.payload.get("source") in ("user", "agent")]
    assert [i for i in ids if i in shown] == shown
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        # The restarted service forgot the connection; the adapter joined it again.
        connections = [c async for c in client.iter_connections(conversation_ids=[conversation_id])]
    assert len(connections) == 1
    await browser.close()


async def test_a_message_sent_while_the_service_is_down_lands_once_it_is_back(
    openhands: OpenHandsServer, rest: httpx.AsyncClient, convsvc: Convsvc
) -> None:
    """The browser's message reaches the web server while convsvc is down: the manager waits
    for convsvc (its channel backing off meanwhile) and sends it once it is back."""
    conversation_id = await new_conversation(rest, "before the outage")
    browser = Browser(openhands)
    await browser.connect(conversation_id)
    await browser.until(echo_of("before the outage"))
    assert convsvc.process is not None
    convsvc.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(convsvc.process.wait, 30)
    await browser.say("during the outage")  # the manager's send now meets a refused connection
    await asyncio.to_thread(convsvc.start)  # back, at the same address, within its timeout
    try:
        await browser.until(echo_of("during the outage"))
    except TimeoutError:
        raise AssertionError(
            f"no echo after the outage; the browser saw {browser.ids()}\n"
            f"--- OpenHands:\n{openhands.log()[-6000:]}\n"
            f"--- convsvc:\n{convsvc.log_path.read_text(errors='replace')[-3000:]}"
        ) from None
    ids = browser.ids()
    assert len(ids) == len(set(ids)), f"duplicates: {ids}"
    await browser.close()


async def test_routes_that_need_the_sandbox_say_why(
    rest: httpx.AsyncClient,
) -> None:
    conversation_id = await new_conversation(rest, "sandbox?")
    for route in ("config", "vscode-url", "web-hosts", "list-files", "git/changes"):
        response = await rest.get(f"/api/conversations/{conversation_id}/{route}")
        # 501 with our explanation, or OpenHands' own 500 wrapping it where a route catches
        # every error: either way the person reads why.
        assert response.status_code in (500, 501), (route, response.text)
        assert "sandbox runtime" in response.text, (route, response.text)

    events = await rest.get(f"/api/conversations/{conversation_id}/events", params={"limit": 5})
    assert events.status_code == 200, events.text  # the event routes search remotely
    assert [e["id"] for e in events.json()["events"]] == list(range(len(events.json()["events"])))


async def test_events_appended_while_a_browser_connects_arrive_once(
    openhands: OpenHandsServer, rest: httpx.AsyncClient, convsvc: Convsvc
) -> None:
    conversation_id = await new_conversation(rest, "start")
    total = 30

    async def keep_sending(client: AsyncConvsvcClient) -> None:
        for n in range(total):
            await client.send_event(
                {"action": "message", "args": {"content": f"burst-{n}"}},
                conversation_id=conversation_id,
            )

    browser = Browser(openhands)
    async with AsyncConvsvcClient(address=convsvc.address) as client:
        sender = asyncio.create_task(keep_sending(client))
        await browser.connect(conversation_id)
        await sender
        await browser.until(echo_of(f"burst-{total - 1}"))
        stored = [e async for e in client.iter_events(conversation_id)]
    ids = browser.ids()
    assert len(ids) == len(set(ids)), f"duplicates: {ids}"
    messages = [e.id for e in stored if e.name == "message"]
    assert [i for i in ids if i in messages] == messages  # none missing, in order
    await browser.close()


async def test_replicas_sharing_redis_deliver_each_event_once(
    replicas: tuple[OpenHandsServer, OpenHandsServer],
) -> None:
    _, on_first, on_second = await one_conversation_in_two_browsers(*replicas)
    await on_first.say("two")
    await on_first.until(echo_of("two"))
    await on_second.until(echo_of("two"))
    for browser in (on_first, on_second):
        ids = browser.ids()
        assert len(ids) == len(set(ids)), f"an event arrived twice: {ids}"
        await browser.close()
