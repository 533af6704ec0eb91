"""Real OpenHands agents through OpenHands' own web server, run the way its users run it:
the server with its own manager (StandaloneConversationManager, the CLI runtime) against the
same server with RemoteConversationManager and the agents on a convsvc worker. The same
scripted fake LLM (tests/openhands/fake_llm.py) answers both; a real socket.io client is
the browser; the two take turns, round by round.

``python -m benchmarks.agents_web ADDRESS CONVSVC_PID ROUNDS`` runs in an OpenHands venv
(the release under test) with convsvc at ADDRESS, and prints JSON:
- ``first_event``: POST /api/conversations -> the browser has the agent's first event;
- ``task``: POST /api/conversations with a tiny task (one command, then finish) -> the
  browser sees the agent finished;
- ``follow_up``: a message typed in the browser -> the browser sees it finished again, with
  where that time went, from the events' own timestamps: ``inbound`` (browser -> the message
  is in the conversation's event stream), ``agent`` (-> the agent's finish is in it),
  ``outbound`` (-> the browser has the finish);
- ``memory``: how much the PSS of every process involved grows per running conversation
  (OpenHands' server alone; the web server, convsvc and the worker's process tree), and each
  conversation process's private memory.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import socketio

from benchmarks.stats import latency_summary
from benchmarks.tree import children_of, private_kib, pss_kib
from tests.openhands.browser import Browser
from tests.openhands.conftest import (
    LLM_KEY,
    OpenHandsServer,
    start_agent_worker,
    start_openhands,
    stop_process,
)
from tests.openhands.fake_llm import FakeLLM

STANDALONE = (
    "openhands.server.conversation_manager.standalone_conversation_manager."
    "StandaloneConversationManager"
)
RUNNING = 3
"""Conversations kept running for the memory figure (OpenHands' default per-user limit)."""

Events = list[dict[str, Any]]


def finished_count(events: Events) -> int:
    return sum(
        1
        for e in events
        if e.get("observation") == "agent_state_changed"
        and e.get("extras", {}).get("agent_state") == "finished"
    )


def first_agent_event(events: Events) -> bool:
    return any(e.get("source") == "agent" and "id" in e for e in events)


def event_time(event: dict[str, Any]) -> float:
    """An event's own timestamp (OpenHands writes local time, without a zone)."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


class TimedBrowser(Browser):  # type: ignore[misc]
    """The test suite's socket.io browser, noting when each event arrived."""

    def __init__(self, server: OpenHandsServer) -> None:
        self.arrived: list[float] = []
        super().__init__(server)

    def _client(self) -> socketio.AsyncClient:
        sio = socketio.AsyncClient(reconnection=False)

        @sio.on("oh_event")  # type: ignore[untyped-decorator]
        async def on_event(data: dict[str, Any]) -> None:
            self.arrived.append(time.time())
            self.events.append(data)
            self._changed.set()

        return sio

    async def when(self, done: Callable[[Events], bool]) -> float:
        """The time the event that made ``done`` true arrived."""
        await self.until(done)
        first = next(k for k in range(1, len(self.events) + 1) if done(self.events[:k]))
        return self.arrived[first - 1]


class Side:
    """One OpenHands web server and what a round does against it."""

    def __init__(self, name: str, server: OpenHandsServer, llm: FakeLLM) -> None:
        self.name = name
        self.server = server
        self.rest = httpx.AsyncClient(base_url=server.url, timeout=120)
        self.llm = llm
        self.first_event: list[float] = []
        self.task: list[float] = []
        self.follow_up: list[float] = []
        self.breakdown: dict[str, list[float]] = {"inbound": [], "agent": [], "outbound": []}

    async def settings(self) -> None:
        response = await self.rest.post(
            "/api/settings",
            json={
                "llm_model": "openai/gpt-4o",
                "llm_api_key": LLM_KEY,
                "llm_base_url": self.llm.base_url,
                "agent": "CodeActAgent",
            },
        )
        response.raise_for_status()

    async def start_task(self, text: str) -> tuple[str, float, TimedBrowser]:
        began = time.time()
        response = await self.rest.post("/api/conversations", json={"initial_user_msg": text})
        response.raise_for_status()
        conversation_id = response.json()["conversation_id"]
        browser = TimedBrowser(self.server)
        await browser.connect(conversation_id)
        return conversation_id, began, browser

    async def round(self, n: int, measured: bool) -> None:
        conversation_id, began, browser = await self.start_task(f"run: echo {self.name}-{n}")
        first = await browser.when(first_agent_event)
        finished = await browser.when(lambda events: finished_count(events) >= 1)
        seen = len(browser.events)
        sent = time.time()
        await browser.say(f"run: echo {self.name}-{n}-again")
        again = await browser.when(lambda events: finished_count(events) >= 2)
        if measured:
            self.first_event.append(first - began)
            self.task.append(finished - began)
            self.follow_up.append(again - sent)
            later = browser.events[seen:]
            message = next(e for e in later if e.get("source") == "user" and "id" in e)
            done = [e for e in later if finished_count([e])][-1]
            self.breakdown["inbound"].append(event_time(message) - sent)
            self.breakdown["agent"].append(event_time(done) - event_time(message))
            self.breakdown["outbound"].append(again - event_time(done))
        await browser.close()
        await self.close(conversation_id)

    async def close(self, conversation_id: str) -> None:
        """Stops the conversation (0.62's /stop; 0.41 has only DELETE, whose 0.62 version
        also asks a sandbox service that needs Docker)."""
        path = f"/api/conversations/{conversation_id}"
        for _ in range(20):
            response = await self.rest.post(f"{path}/stop")
            if response.status_code in (404, 405):
                response = await self.rest.delete(path)
            # OpenHands writes its metadata files in place: a call that reads one mid-write
            # answers 500 and is made again.
            if response.status_code != 500:
                break
            await asyncio.sleep(0.1)  # another process's file: nothing to wait on
        if response.status_code != 200:
            raise RuntimeError(
                f"{self.name}: stopping answered {response.status_code}:\n"
                f"{self.server.log()[-4000:]}"
            )

    async def running(self, count: int) -> list[str]:
        """``count`` conversations that finished a task and keep running."""
        started = []
        for n in range(count):
            conversation_id, _, browser = await self.start_task(f"run: echo memory-{n}")
            await browser.until(lambda events: finished_count(events) >= 1)
            await browser.close()
            started.append(conversation_id)
        return started

    def results(self) -> dict[str, Any]:
        return {
            "first_event": latency_summary(self.first_event),
            "task": latency_summary(self.task),
            "follow_up": latency_summary(self.follow_up),
            "follow_up_breakdown_p50_ms": {
                part: latency_summary(values)["p50_ms"] for part, values in self.breakdown.items()
            },
        }


async def memory_growth(side: Side, pids: Callable[[], list[int]]) -> dict[str, Any]:
    before = sum(pss_kib(pid) for pid in pids())
    conversations = await side.running(RUNNING)
    after = sum(pss_kib(pid) for pid in pids())
    for conversation_id in conversations:
        await side.close(conversation_id)
    return {"pss_mib_per_conversation": (after - before) / RUNNING / 1024}


async def measure(address: str, convsvc_pid: int, rounds: int) -> dict[str, Any]:
    llm = FakeLLM().start()
    try:
        with tempfile.TemporaryDirectory(prefix="agents-web-") as tmp:
            return await measure_in(Path(tmp), address, convsvc_pid, rounds, llm)
    finally:
        llm.stop()


async def measure_in(
    root: Path, address: str, convsvc_pid: int, rounds: int, llm: FakeLLM
) -> dict[str, Any]:
    (root / "own").mkdir()
    (root / "remote").mkdir()
    worker = start_agent_worker(root, address, "bench-worker")
    quiet = {"LLM_NUM_RETRIES": "0"}
    own_server = start_openhands(
        root / "own",
        address,
        "openhands-own",
        CONVERSATION_MANAGER_CLASS=STANDALONE,
        RUNTIME="cli",
        WORKSPACE_BASE=str(root / "own" / "workspace"),
        **quiet,
    )
    remote_server = start_openhands(root / "remote", address, "openhands-remote", **quiet)
    own = Side("own", own_server, llm)
    remote = Side("remote", remote_server, llm)
    try:
        for side in (own, remote):
            await side.settings()
            await side.round(0, measured=False)  # first-use costs on both sides
        for n in range(1, rounds + 1):
            # Take turns, and change who goes first, so that drift hits both alike.
            for side in (own, remote) if n % 2 else (remote, own):
                await side.round(n, measured=True)

        own_memory = await memory_growth(own, lambda: [own_server.process.pid])
        remote_memory = await memory_growth(
            remote, lambda: [remote_server.process.pid, convsvc_pid, worker.process.pid]
        )
        # Each conversation process, alone: what it holds that no other process shares.
        conversations = await remote.running(RUNNING)
        processes = [
            pid for zygote in children_of(worker.process.pid) for pid in children_of(zygote)
        ]
        remote_memory["conversation_processes"] = len(processes)
        remote_memory["private_mib_each"] = [round(private_kib(p) / 1024, 1) for p in processes]
        remote_memory["pss_mib_each"] = [round(pss_kib(p) / 1024, 1) for p in processes]
        for conversation_id in conversations:
            await remote.close(conversation_id)
        results = {"own": own.results() | {"memory": own_memory}}
        results["remote"] = remote.results() | {"memory": remote_memory}
    finally:
        for side in (own, remote):
            await side.rest.aclose()
        for process in (own_server.process, remote_server.process, worker.process):
            stop_process(process)
    for figure in ("first_event", "task", "follow_up"):
        results[f"{figure}_ratio"] = (
            results["remote"][figure]["p50_ms"] / results["own"][figure]["p50_ms"]
        )
    return results


if __name__ == "__main__":
    address, convsvc_pid, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(measure(address, convsvc_pid, rounds))))
