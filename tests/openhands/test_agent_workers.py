"""Real OpenHands agents (CodeActAgent, the CLI runtime, a scripted LLM) on convworker
processes, through OpenHands' own web server with RemoteConversationManager and through the
gRPC API. The worker runs in this venv (this OpenHands release); convsvc in the main venv."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from openhands.core.config import LLMConfig, OpenHandsConfig
from openhands.server.config.server_config import ServerConfig
from openhands.server.monitoring import MonitoringListener
from openhands.storage.memory import InMemoryFileStore
from pydantic import SecretStr

from convclient import (
    AsyncConvsvcClient,
    BusyPolicy,
    ClientSettings,
    FailedPreconditionError,
    SecurityRisk,
)
from convclient.openhands import RemoteConversationManager
from convclient.openhands.compat import openhands_version
from tests.openhands.browser import EVENT_TIMEOUT, Browser
from tests.openhands.conftest import (
    LLM_KEY,
    AgentWorker,
    Convsvc,
    OpenHandsServer,
    start_agent_worker,
)
from tests.openhands.fake_llm import TITLE, FakeLLM

CUSTOM_SECRET = "custom-secret-7d3f9a1c55e2"

Events = list[dict[str, Any]]


def finished_tasks(events: Events) -> int:
    return sum(1 for e in events if e.get("action") == "finish")


def tasks_done(count: int) -> Callable[[Events], bool]:
    """True once ``count`` tasks finished and the agent reported it."""

    def done(events: Events) -> bool:
        states = [
            e["extras"]["agent_state"]
            for e in events
            if e.get("observation") == "agent_state_changed"
        ]
        return finished_tasks(events) >= count and bool(states) and states[-1] == "finished"

    return done


def commands(events: Events) -> list[str]:
    return [e["args"]["command"] for e in events if e.get("action") == "run"]


def exit_codes(events: Events) -> list[int]:
    codes = []
    for event in events:
        if event.get("observation") == "run":
            extras = event.get("extras", {})
            codes.append(extras.get("metadata", {}).get("exit_code", extras.get("exit_code")))
    return codes


def assert_once_in_order(ids: list[int]) -> None:
    assert ids == sorted(ids), f"out of order: {ids}"
    assert len(ids) == len(set(ids)), f"duplicates: {ids}"


def settings(fake_llm: FakeLLM) -> dict[str, Any]:
    # A model litellm knows to call tools natively; the fake LLM serves it.
    return {
        "llm_model": "openai/gpt-4o",
        "llm_api_key": LLM_KEY,
        "llm_base_url": fake_llm.base_url,
        "agent": "CodeActAgent",
    }


@pytest.fixture
async def rest(
    agent_openhands: OpenHandsServer, fake_llm: FakeLLM, agent_workers: list[AgentWorker]
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agent_openhands.url, timeout=EVENT_TIMEOUT) as client:
        response = await client.post("/api/settings", json=settings(fake_llm))
        assert response.status_code == 200, response.text
        yield client


async def metadata_when(
    rest: httpx.AsyncClient, conversation_id: str, condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The conversation's metadata once ``condition`` holds. The web process writes it as
    events arrive; OpenHands' file store writes are not atomic, so a read that meets a write
    answers 500 and is read again."""
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            response = await rest.get(f"/api/conversations/{conversation_id}")
            if response.status_code == 200 and condition(info := response.json()):
                return info
            await asyncio.sleep(0.1)  # another process's file: nothing to wait on


async def stored_metadata_when(
    session_dir: Path, condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The metadata file OpenHands keeps for a conversation, once ``condition`` holds."""
    path = session_dir / "metadata.json"
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            try:
                stored: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):  # not yet written, or met mid-write
                stored = {}
            if condition(stored):
                return stored
            await asyncio.sleep(0.1)  # another process's file: nothing to wait on


async def tail_until(
    client: AsyncConvsvcClient, conversation_id: str, done: Callable[[Events], bool]
) -> Events:
    events: Events = []
    async with asyncio.timeout(EVENT_TIMEOUT):
        async for batch in client.tail_events(conversation_id):
            events.extend(event.payload for event in batch.events)
            if done(events):
                return events
    raise AssertionError("the stream ended")


async def test_a_task_typed_in_the_browser_runs_a_command_and_finishes(
    agent_openhands: OpenHandsServer, rest: httpx.AsyncClient, fake_llm: FakeLLM
) -> None:
    response = await rest.post(
        "/api/conversations", json={"initial_user_msg": "run: echo first-task"}
    )
    assert response.status_code == 200, response.text
    conversation_id = response.json()["conversation_id"]
    browser = Browser(agent_openhands)
    await browser.connect(conversation_id)
    await browser.until(tasks_done(1))
    assert commands(browser.events) == ["echo first-task"]
    assert exit_codes(browser.events) == [0]
    await browser.say("run: echo second-task")
    await browser.until(tasks_done(2))
    assert commands(browser.events) == ["echo first-task", "echo second-task"]
    assert exit_codes(browser.events) == [0, 0]
    assert_once_in_order(browser.ids())

    info = await metadata_when(rest, conversation_id, lambda i: i["title"] == TITLE)
    assert info["last_updated_at"] > info["created_at"]
    # Cost and tokens as OpenHands' manager keeps them: the fake LLM reports 100 prompt and
    # 10 completion tokens per call, and four calls were made (two per task).
    # The web process saves them a moment after each event (debounced): wait for the last.
    stored = await stored_metadata_when(
        agent_openhands.log_path.parent / "file-store" / "sessions" / conversation_id,
        lambda m: m.get("prompt_tokens", 0) >= 400,
    )
    assert stored["prompt_tokens"] == 400
    assert stored["completion_tokens"] == 40
    assert stored["total_tokens"] == 440
    assert stored["accumulated_cost"] > 0
    await browser.close()


async def test_two_conversations_work_in_their_own_workspaces(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
        for cid in ("where-a", "where-b"):
            await client.start_conversation(
                cid,
                settings=settings(fake_llm),
                initial_user_message={
                    "action": "message",
                    "args": {"content": "run: pwd > where.txt"},
                },
            )
        await asyncio.gather(
            *(tail_until(client, cid, tasks_done(1)) for cid in ("where-a", "where-b"))
        )
    [worker] = agent_workers[:1]
    for cid in ("where-a", "where-b"):
        workspace = worker.workspace_root / cid
        assert Path((workspace / "where.txt").read_text().strip()) == workspace.resolve()


async def test_secrets_reach_the_agent_but_no_file_or_log(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
        await client.start_conversation(
            "secrets",
            settings={
                **settings(fake_llm),
                "custom_secrets": {"MY_TOKEN": {"secret": CUSTOM_SECRET, "description": ""}},
            },
            initial_user_message={
                "action": "message",
                "args": {"content": "run: echo $MY_TOKEN > token.txt"},
            },
        )
        await tail_until(client, "secrets", tasks_done(1))
    worker = agent_workers[0]
    # The agent's shell had the secret, and the LLM was called with the key...
    assert (worker.workspace_root / "secrets" / "token.txt").read_text().strip() == CUSTOM_SECRET
    assert f"Bearer {LLM_KEY}" in fake_llm.api_keys
    # ...but neither is in convsvc's files or log, nor in the worker's log.
    stored = agent_convsvc.stored_and_logged_bytes() + worker.log_path.read_bytes()
    assert CUSTOM_SECRET.encode() not in stored
    assert LLM_KEY.encode() not in stored


async def test_a_killed_worker_s_conversation_continues_with_its_history(
    tmp_path: Path,
    agent_openhands: OpenHandsServer,
    agent_convsvc: Convsvc,
    agent_workers: list[AgentWorker],
    rest: httpx.AsyncClient,
    fake_llm: FakeLLM,
) -> None:
    response = await rest.post(
        "/api/conversations", json={"initial_user_msg": "run: echo before-the-kill"}
    )
    conversation_id = response.json()["conversation_id"]
    browser = Browser(agent_openhands)
    await browser.connect(conversation_id)
    await browser.until(tasks_done(1))

    replacement = start_agent_worker(tmp_path, agent_convsvc.address, "worker-b")
    agent_workers.append(replacement)
    seen_before_kill = len(browser.events)
    agent_workers[0].kill()  # kill -9 of the worker that runs the conversation
    # The replacement starts OpenHands' runtime again; the connected browser sees its status.
    await browser.until(
        lambda events: any(
            e.get("status_update") and e.get("id") == "STATUS$STARTING_RUNTIME"
            for e in events[seen_before_kill:]
        )
    )
    await browser.say("run: echo after-the-kill")
    await browser.until(tasks_done(2))
    assert commands(browser.events) == ["echo before-the-kill", "echo after-the-kill"]
    assert_once_in_order(browser.ids())
    # The restored agent showed the LLM what happened before the kill.
    prompt = fake_llm.prompts()[-1]
    assert "before-the-kill" in prompt and "after-the-kill" in prompt
    async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
        stored = [e.id async for e in client.iter_events(conversation_id)]
    assert stored == list(range(len(stored)))
    await browser.close()


@pytest.mark.skipif(
    openhands_version() < (0, 54), reason="the /microagents route came with OpenHands 0.54"
)
async def test_the_microagents_route_answers_for_a_remote_conversation(
    agent_openhands: OpenHandsServer, rest: httpx.AsyncClient
) -> None:
    response = await rest.post("/api/conversations", json={"initial_user_msg": "run: true"})
    conversation_id = response.json()["conversation_id"]
    listed = await rest.get(f"/api/conversations/{conversation_id}/microagents")
    assert listed.status_code == 200, listed.text
    [microagent] = listed.json()["microagents"]
    assert microagent["name"] == "convsvc-test"
    assert microagent["type"] == "knowledge"
    assert microagent["triggers"] == ["convsvc-test"]


async def test_llm_completions_are_answered_by_the_conversation_s_worker(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
        await client.start_conversation(
            "completions",
            settings=settings(fake_llm),
            initial_user_message={"action": "message", "args": {"content": "run: true"}},
        )
        await tail_until(client, "completions", tasks_done(1))
    sio = socketio.AsyncServer(async_mode="asgi")
    manager = RemoteConversationManager(
        sio,
        OpenHandsConfig(),
        InMemoryFileStore(),
        ServerConfig(),
        MonitoringListener(),
        client_settings=ClientSettings(address=agent_convsvc.address),
    )
    llm_config = LLMConfig(
        model="openai/gpt-4o", api_key=SecretStr(LLM_KEY), base_url=fake_llm.base_url
    )
    calls_before = len(fake_llm.requests)
    async with manager:
        messages = [{"role": "user", "content": "echo: remembered"}]
        answer = await manager.request_llm_completion(
            "completions", "remember_prompt", llm_config, messages
        )
        assert answer == "remembered"
        # OpenHands 0.62's route passes (service_id, sid) the other way round.
        swapped = await manager.request_llm_completion(
            "remember_prompt", "completions", llm_config, messages
        )
        assert swapped == "remembered"
    # The worker's LLM made the calls (with the key), and nothing was logged for them.
    assert len(fake_llm.requests) == calls_before + 2
    assert fake_llm.api_keys[-1] == f"Bearer {LLM_KEY}"
    async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
        logged = [e.payload async for e in client.iter_events("completions")]
    assert not [e for e in logged if "remembered" in json.dumps(e)]


async def test_a_busy_openhands_agent_is_paused_resumed_and_interrupted(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    """OpenHands' own controller handles the change_agent_state events run control writes,
    and reports the states that answer each control."""
    # A close waits for the worker to release the loop: OpenHands' CLI runtime lets the
    # interrupted `sleep` run on, and the worker's stop timeout ends it (10 s).
    async with AsyncConvsvcClient(address=agent_convsvc.address, timeout_seconds=60) as client:
        await client.start_conversation(
            "controlled",
            settings=settings(fake_llm),
            initial_user_message={"action": "message", "args": {"content": "run: sleep 120"}},
        )
        # The agent runs the command: it is busy until it ends.
        await tail_until(client, "controlled", lambda events: bool(commands(events)))
        assert (await client.get_conversation("controlled")).agent_state == "running"
        with pytest.raises(FailedPreconditionError) as refused:
            await client.send_event(
                {"action": "message", "args": {"content": "run: true"}},
                conversation_id="controlled",
                busy_policy=BusyPolicy.REJECT,
            )
        assert refused.value.metadata["agent_state"] == "running"

        paused = await client.pause_agent("controlled")
        assert paused.agent_state == "paused" and paused.event_id is not None
        resumed = await client.resume_agent("controlled")
        assert resumed.agent_state != "paused"
        stopped = await client.interrupt_agent("controlled")
        assert stopped.agent_state == "stopped"
        # Interrupted, it keeps its loop and history and takes the next task.
        await client.send_event(
            {"action": "message", "args": {"content": "run: echo after-the-interrupt"}},
            conversation_id="controlled",
        )
        events = await tail_until(
            client, "controlled", lambda events: "echo after-the-interrupt" in commands(events)
        )
        assert commands(events) == ["sleep 120", "echo after-the-interrupt"]
        await client.close_conversation("controlled")


async def test_the_browser_s_pause_and_stop_buttons_reach_the_agent_as_run_control(
    agent_openhands: OpenHandsServer,
    agent_convsvc: Convsvc,
    rest: httpx.AsyncClient,
) -> None:
    response = await rest.post("/api/conversations", json={"initial_user_msg": "run: sleep 120"})
    conversation_id = response.json()["conversation_id"]
    browser = Browser(agent_openhands)
    await browser.connect(conversation_id)
    await browser.until(lambda events: bool(commands(events)))

    def state_is(state: str) -> Callable[[Events], bool]:
        def done(events: Events) -> bool:
            states = [
                e["extras"]["agent_state"]
                for e in events
                if e.get("observation") == "agent_state_changed"
            ]
            return bool(states) and states[-1] == state

        return done

    # What OpenHands' frontend emits for its pause and stop buttons.
    for asked in ("paused", "stopped"):
        await browser.sio.emit(
            "oh_user_action", {"action": "change_agent_state", "args": {"agent_state": asked}}
        )
        await browser.until(state_is(asked))
    assert_once_in_order(browser.ids())
    async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
        audit = await client.list_audit_entries(conversation_id=conversation_id)
    assert [e.method for e in audit.items if e.method == "ControlAgent"] == ["ControlAgent"] * 2
    await browser.close()


def agent_states(events: Events) -> list[str]:
    return [
        e["extras"]["agent_state"] for e in events if e.get("observation") == "agent_state_changed"
    ]


def awaiting_confirmation(events: Events) -> bool:
    """True once the agent waits for approval of an action it logged."""
    proposed = [
        e for e in events if e.get("args", {}).get("confirmation_state") == "awaiting_confirmation"
    ]
    states = agent_states(events)
    return bool(proposed) and bool(states) and states[-1] == "awaiting_user_confirmation"


def outputs(events: Events) -> str:
    return "\n".join(str(e.get("content", "")) for e in events if e.get("observation") == "run")


async def test_an_openhands_agent_in_confirmation_mode_waits_for_approval_over_grpc(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    """OpenHands' controller stops before a risky command; the conversation shows it and
    ConfirmAction decides, as the browser's buttons would."""
    async with AsyncConvsvcClient(address=agent_convsvc.address, timeout_seconds=60) as client:
        await client.start_conversation(
            "confirming",
            settings={**settings(fake_llm), "confirmation_mode": True},
            initial_user_message={
                "action": "message",
                "args": {"content": "run: rm -f absent-file && echo approved-ran"},
            },
        )
        await tail_until(client, "confirming", awaiting_confirmation)
        pending = (await client.get_conversation("confirming")).pending_action
        assert pending is not None
        assert (pending.action, pending.content) == (
            "run",
            "rm -f absent-file && echo approved-ran",
        )
        # Without a security analyzer 0.62 asks the LLM for no risk: the action is unrated
        # (and so waits); 0.41's actions carry no risk at all.
        unrated = SecurityRisk.UNKNOWN if openhands_version() >= (0, 62) else None
        assert pending.security_risk is unrated
        approved = await client.approve_action("confirming", pending.event_id)
        assert approved.agent_state == "user_confirmed"
        events = await tail_until(client, "confirming", tasks_done(1))
        assert "approved-ran" in outputs(events)
        assert (await client.get_conversation("confirming")).pending_action is None

        await client.send_event(
            {"action": "message", "args": {"content": "run: rm -f other-file && echo never-ran"}},
            conversation_id="confirming",
        )
        events = await tail_until(
            client,
            "confirming",
            lambda events: (
                awaiting_confirmation(events)
                and finished_tasks(events) == 1
                and "never-ran" in commands(events)[-1]
            ),
        )
        pending = (await client.get_conversation("confirming")).pending_action
        assert pending is not None and "never-ran" in pending.content
        with pytest.raises(FailedPreconditionError) as stale:
            await client.reject_action("confirming", approved.event_id)
        assert stale.value.reason == "ACTION_NOT_PENDING"
        rejected = await client.reject_action("confirming", pending.event_id)
        assert rejected.agent_state == "user_rejected"
        events = await tail_until(
            client, "confirming", lambda events: agent_states(events)[-1] == "awaiting_user_input"
        )
        assert "never-ran" not in outputs(events)
        await client.close_conversation("confirming")


async def test_the_browser_s_approval_reaches_the_agent_as_confirm_action(
    agent_openhands: OpenHandsServer,
    agent_convsvc: Convsvc,
    rest: httpx.AsyncClient,
    fake_llm: FakeLLM,
) -> None:
    confirming = {**settings(fake_llm), "confirmation_mode": True}
    response = await rest.post("/api/settings", json=confirming)
    assert response.status_code == 200, response.text
    try:
        response = await rest.post(
            "/api/conversations",
            json={"initial_user_msg": "run: rm -f absent-file && echo browser-approved"},
        )
        conversation_id = response.json()["conversation_id"]
        browser = Browser(agent_openhands)
        await browser.connect(conversation_id)
        await browser.until(awaiting_confirmation)
        # What OpenHands' frontend emits for its approve button.
        await browser.sio.emit(
            "oh_user_action",
            {"action": "change_agent_state", "args": {"agent_state": "user_confirmed"}},
        )
        await browser.until(lambda events: "browser-approved" in outputs(events))
        assert_once_in_order(browser.ids())
        async with AsyncConvsvcClient(address=agent_convsvc.address) as client:
            audit = await client.list_audit_entries(conversation_id=conversation_id)
        assert [(e.method, e.code) for e in audit.items if e.method == "ConfirmAction"] == [
            ("ConfirmAction", "OK")
        ]
        await browser.close()
    finally:
        await rest.post("/api/settings", json=settings(fake_llm))


async def test_a_fork_of_an_openhands_conversation_restores_its_history(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    """A fork's OpenHands agent restores from the copied log as after a takeover (the LLM
    sees the source's task), with the settings that are not stored sent again (the API key;
    the LLM's URL, which may hold credentials)."""
    async with AsyncConvsvcClient(address=agent_convsvc.address, timeout_seconds=60) as client:
        await client.start_conversation(
            "fork-source",
            settings=settings(fake_llm),
            initial_user_message={
                "action": "message",
                "args": {"content": "run: echo before-the-fork"},
            },
        )
        await tail_until(client, "fork-source", tasks_done(1))
        await client.close_conversation("fork-source")
        keys_before = len(fake_llm.api_keys)
        await client.fork_conversation(
            "fork-source",
            conversation_id="forked",
            settings={"llm_api_key": LLM_KEY, "llm_base_url": fake_llm.base_url},
        )
        await client.send_event(
            {"action": "message", "args": {"content": "run: echo after-the-fork"}},
            conversation_id="forked",
        )
        events = await tail_until(client, "forked", tasks_done(2))
        assert commands(events) == ["echo before-the-fork", "echo after-the-fork"]
        prompt = fake_llm.prompts()[-1]
        assert "before-the-fork" in prompt and "after-the-fork" in prompt
        assert fake_llm.api_keys[keys_before:] and all(
            key == f"Bearer {LLM_KEY}" for key in fake_llm.api_keys[keys_before:]
        )
        source = [e.payload async for e in client.iter_events("fork-source")]
        assert commands(source) == ["echo before-the-fork"]  # the source is untouched
        await client.close_conversation("forked")
