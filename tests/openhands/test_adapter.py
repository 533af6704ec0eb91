"""RemoteConversationManager with OpenHands' real classes, in this process, against a real
convsvc: how OpenHands loads it, its event store, its statuses, and an unreachable service."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import socketio
from fastapi import HTTPException
from openhands.core.config import OpenHandsConfig
from openhands.events.action import MessageAction
from openhands.events.event_filter import EventFilter
from openhands.events.observation import AgentStateChangedObservation
from openhands.server.config.server_config import ServerConfig
from openhands.server.conversation_manager.conversation_manager import ConversationManager
from openhands.server.monitoring import MonitoringListener
from openhands.storage.data_models.conversation_status import ConversationStatus
from openhands.storage.data_models.settings import Settings
from openhands.storage.memory import InMemoryFileStore
from openhands.utils.import_utils import get_impl
from pydantic import SecretStr

from convclient import AsyncConvsvcClient, ClientSettings, ServiceUnavailableError
from convclient.openhands import RemoteConversationManager
from convclient.openhands.manager import settings_to_json
from tests.openhands.conftest import LLM_KEY, MANAGER_CLASS, Convsvc


def build(settings: ClientSettings) -> RemoteConversationManager:
    return RemoteConversationManager(
        socketio.AsyncServer(async_mode="asgi"),
        OpenHandsConfig(),
        InMemoryFileStore(),
        ServerConfig(),
        MonitoringListener(),
        client_settings=settings,
    )


@pytest.fixture
async def manager(convsvc: Convsvc) -> AsyncIterator[RemoteConversationManager]:
    async with build(ClientSettings(address=convsvc.address)) as opened:
        yield opened


async def echoed(convsvc: Convsvc, conversation_id: str, content: str) -> None:
    async with AsyncConvsvcClient(address=convsvc.address) as client, asyncio.timeout(30):
        async for batch in client.tail_events(conversation_id):
            if any(
                e.source == "agent" and e.payload.get("message") == content for e in batch.events
            ):
                return


def test_openhands_loads_it_as_its_conversation_manager() -> None:
    loaded = get_impl(ConversationManager, MANAGER_CLASS)
    assert loaded is RemoteConversationManager
    assert issubclass(loaded, ConversationManager)
    assert not loaded.__abstractmethods__  # every abstract method of this release is there
    instance = loaded.get_instance(
        socketio.AsyncServer(),
        OpenHandsConfig(),
        InMemoryFileStore(),
        ServerConfig(),
        MonitoringListener(),
    )
    assert isinstance(instance, RemoteConversationManager)


async def test_the_event_store_searches_the_service(
    manager: RemoteConversationManager, convsvc: Convsvc
) -> None:
    info = await manager.maybe_start_agent_loop(
        "store-1", Settings(), None, initial_user_msg=MessageAction(content="hi store")
    )
    assert info.status in (ConversationStatus.STARTING, ConversationStatus.RUNNING)
    await echoed(convsvc, "store-1", "hi store")
    store = info.event_store
    assert store is not None

    everything = list(store.search_events())
    ids = [e.id for e in everything]
    assert ids == list(range(len(ids)))
    assert [e.id for e in store.search_events(start_id=1, end_id=3)] == [1, 2, 3]
    assert [e.id for e in store.search_events(reverse=True, limit=2)] == ids[::-1][:2]
    agent_only = list(store.search_events(filter=EventFilter(source="agent")))
    assert agent_only
    assert all(e.source == "agent" for e in agent_only)
    assert any(isinstance(e, MessageAction) and e.content == "hi store" for e in agent_only)
    assert isinstance(store.get_event(0), AgentStateChangedObservation)
    assert store.get_latest_event().id == ids[-1]
    assert store.get_latest_event_id() == ids[-1]
    with pytest.raises(FileNotFoundError):
        store.get_event(10_000)


async def test_lists_statuses_and_close(manager: RemoteConversationManager) -> None:
    await manager.maybe_start_agent_loop("list-1", Settings(), "alice")
    assert "list-1" in await manager.get_running_agent_loops(user_id="alice")
    assert await manager.get_running_agent_loops(user_id="bob") == set()
    assert await manager.is_agent_loop_running("list-1")
    [info] = await manager.get_agent_loop_info(filter_to_sids={"list-1"})
    assert info.conversation_id == "list-1"
    assert info.status in (ConversationStatus.STARTING, ConversationStatus.RUNNING)
    assert await manager.get_connections(filter_to_sids={"list-1"}) == {}

    await manager.close_session("list-1")
    assert not await manager.is_agent_loop_running("list-1")
    assert await manager.get_agent_loop_info(filter_to_sids={"list-1"}) == []


async def test_attach_gives_routes_the_remote_event_stream(
    manager: RemoteConversationManager,
) -> None:
    await manager.maybe_start_agent_loop("attach-1", Settings(), None)
    conversation = await manager.attach_to_conversation("attach-1")
    assert conversation is not None
    assert conversation.sid == "attach-1"
    assert conversation.event_stream.get_event(0).id == 0
    with pytest.raises(HTTPException) as caught:
        _ = conversation.runtime
    assert caught.value.status_code == 501
    assert "convsvc" in caught.value.detail
    await manager.detach_from_conversation(conversation)
    assert await manager.attach_to_conversation("no-such-conversation") is None


async def test_lists_are_answered_from_the_watched_copy_with_reads_of_own_writes(
    manager: RemoteConversationManager, convsvc: Convsvc
) -> None:
    await asyncio.wait_for(manager.mirror.wait_live(), 10)
    list_calls = 0
    list_conversations = manager.client.list_conversations

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal list_calls
        list_calls += 1
        return await list_conversations(*args, **kwargs)

    manager.client.list_conversations = counted  # type: ignore[method-assign]

    # Another web process starts and joins a conversation: this one learns it by the watch.
    async with AsyncConvsvcClient(address=convsvc.address) as other:
        await other.join_conversation("elsewhere", "sock-x", user_id="carol")
    async with asyncio.timeout(10):
        while await manager.get_connections(user_id="carol") != {"sock-x": "elsewhere"}:
            await manager.mirror.settle(lambda m: m.has_connection("elsewhere", "sock-x"))
    assert await manager.get_running_agent_loops(user_id="carol") == {"elsewhere"}

    # Its own start and close are seen by its very next read.
    await manager.maybe_start_agent_loop("mine", Settings(), "dora")
    assert await manager.get_running_agent_loops(user_id="dora") == {"mine"}
    [info] = await manager.get_agent_loop_info(user_id="dora")
    assert info.conversation_id == "mine"
    await manager.close_session("mine")
    assert await manager.get_running_agent_loops(user_id="dora") == set()
    assert list_calls == 0  # none of these answers needed a list call


def test_settings_reach_the_service_with_their_secrets() -> None:
    dumped = settings_to_json(Settings(llm_model="m", llm_api_key=SecretStr(LLM_KEY)))
    assert dumped["llm_api_key"] == LLM_KEY  # the service redacts it before storing or logging
    assert dumped["llm_model"] == "m"


async def test_an_unreachable_service_fails_fast_and_clearly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    async with build(ClientSettings(address=address, timeout_seconds=2)) as manager:
        async with asyncio.timeout(15):
            with pytest.raises(ServiceUnavailableError) as caught:
                await manager.maybe_start_agent_loop("c1", Settings(), None)
            with pytest.raises(ServiceUnavailableError):
                await manager.get_agent_loop_info()
    assert address in str(caught.value)
