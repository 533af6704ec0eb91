"""OpenHands in front of a convsvc cluster: two web replicas (sharing Redis), each talking to
a different node of two on one PostgreSQL. The browser sees each event once whichever replica
and node it goes through."""

from __future__ import annotations

import httpx

from convclient import AsyncConvsvcClient
from tests.openhands.browser import EVENT_TIMEOUT
from tests.openhands.conftest import LLM_KEY, Convsvc, OpenHandsServer
from tests.openhands.test_openhands_server import echo_of, one_conversation_in_two_browsers


async def test_two_replicas_on_two_nodes_serve_one_conversation(
    cluster_replicas: tuple[OpenHandsServer, OpenHandsServer],
    cluster_nodes: tuple[Convsvc, Convsvc],
) -> None:
    first, second = cluster_replicas
    conversation_id, on_first, on_second = await one_conversation_in_two_browsers(first, second)
    # Typed in each browser: through its replica's node, forwarded to the owner if need be.
    await on_second.say("two")
    await on_first.until(echo_of("two"))
    await on_second.until(echo_of("two"))
    await on_first.say("three")
    await on_second.until(echo_of("three"))
    await on_first.until(echo_of("three"))
    for browser in (on_first, on_second):
        ids = browser.ids()
        assert len(ids) == len(set(ids)), f"an event arrived twice: {ids}"
        assert ids == sorted(ids)

    # Both nodes give the same answers: the connections of both replicas, the same log.
    answers = []
    for node in cluster_nodes:
        async with AsyncConvsvcClient(address=node.address) as client:
            view = await client.get_conversation(conversation_id)
            connections = [
                c async for c in client.iter_connections(conversation_ids=[conversation_id])
            ]
            events = [e.id async for e in client.iter_events(conversation_id)]
            answers.append((view.latest_event_id, len(connections), events))
    assert answers[0] == answers[1]
    assert answers[0][1] == 2  # one connection per browser, whichever node it joined through

    async with httpx.AsyncClient(base_url=second.url, timeout=EVENT_TIMEOUT) as rest:
        deleted = await rest.delete(f"/api/conversations/{conversation_id}")
        assert deleted.status_code == 200, deleted.text
    async with AsyncConvsvcClient(address=cluster_nodes[0].address) as client:
        assert (await client.get_conversation(conversation_id)).status.value == "STOPPED"
    for browser in (on_first, on_second):
        await browser.close()
    for node in cluster_nodes:
        assert LLM_KEY.encode() not in node.log_path.read_bytes()
