"""Real OpenHands agents on workers against OpenHands' own standalone manager, run in an
OpenHands 0.62 venv with the scripted fake LLM (tests/openhands/fake_llm.py) and the CLI
runtime.

``python -m benchmarks.agents_remote ADDRESS COUNT`` (convsvc at ADDRESS, default agent
openhands) prints JSON:
- start -> the agent's first event: a warm worker (fork from the zygote), a cold one
  (``--no-fork``: a new interpreter per conversation) and the standalone manager in-process;
- a tiny conversation (message -> command -> finish), RemoteConversationManager against the
  standalone manager, each until the browser would see ``finished``;
- PSS of the running conversation processes (shared pages counted once).
"""

from __future__ import annotations

import asyncio
import json
import os

# Before OpenHands is imported: it reads this once (see benchmarks/no_mcp.py).
os.environ["OPENHANDS_MCP_CONFIG_CLS"] = "benchmarks.no_mcp.WithoutOpenHandsServer"
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openhands.agenthub  # noqa: F401 - registers the agents for the standalone manager
from openhands.core.config import OpenHandsConfig
from openhands.events.action import MessageAction
from openhands.server.config.server_config import ServerConfig
from openhands.server.conversation_manager.standalone_conversation_manager import (
    StandaloneConversationManager,
)
from openhands.server.monitoring import MonitoringListener
from openhands.storage.conversation.file_conversation_store import FileConversationStore
from openhands.storage.data_models.conversation_metadata import ConversationMetadata
from openhands.storage.data_models.settings import Settings
from openhands.storage.memory import InMemoryFileStore
from openhands.utils.conversation_summary import get_default_conversation_title
from pydantic import SecretStr

from benchmarks.adapter_remote import RecordingServer
from benchmarks.stats import latency_summary
from convclient import AsyncConvsvcClient, ClientSettings
from convclient.openhands import RemoteConversationManager
from tests.openhands.fake_llm import FakeLLM  # the same scripted LLM the tests use

TIMEOUT = 120.0


class RoomRecordingServer(RecordingServer):
    """Records emits and keeps room membership: OpenHands' own session holds its first
    events until a client is in the conversation's room, as a browser would be."""

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()

    async def emit(self, event: str, data: Any = None, **_: Any) -> None:
        # OpenHands' sessions emit from their own threads' loops: hand over thread-safely.
        if event == "oh_event":
            item = (time.perf_counter(), data)
            self._loop.call_soon_threadsafe(self.emitted.put_nowait, item)

    async def enter_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        self.manager.basic_enter_room(sid, namespace or "/", room, eio_sid=sid)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def pss_kib(pid: int) -> int:
    """Proportional set size of a process and all its descendants."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    except OSError:
        return 0
    return total + sum(pss_kib(child) for child in children_of(pid))


class Worker:
    def __init__(self, address: str, root: Path, name: str, *, fork: bool) -> None:
        self.log = root / f"{name}.log"
        argv = [sys.executable, "-m", "convworker", "--address", address, "--worker-id", name]
        argv += ["--kind", "openhands", "--workspace-root", str(root / name), "--capacity", "16"]
        if not fork:
            argv.append("--no-fork")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env={**env, "LLM_NUM_RETRIES": "0"}, stdout=log, stderr=log
            )
        deadline = time.monotonic() + TIMEOUT
        while "attached to" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not attach:\n{self.log.read_text()}")
            time.sleep(0.1)  # another process's start-up: no event to wait on

    def conversation_pids(self) -> list[int]:
        return [pid for zygote in children_of(self.process.pid) for pid in children_of(zygote)]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def settings_json(llm: FakeLLM) -> dict[str, Any]:
    return {
        "llm_model": "openai/gpt-4o",
        "llm_api_key": "sk-bench",
        "llm_base_url": llm.base_url,
        "agent": "CodeActAgent",
    }


def message(text: str) -> dict[str, Any]:
    return {"action": "message", "args": {"content": text}}


async def remote_first_events(address: str, llm: FakeLLM, prefix: str, count: int) -> list[float]:
    """StartConversation -> the first event the agent logs (after convsvc's ``loading``)."""
    latencies = []
    async with AsyncConvsvcClient(address=address) as client:
        for n in range(count):
            cid = f"{prefix}-{n}"
            began = time.perf_counter()
            await client.start_conversation(
                cid, settings=settings_json(llm), initial_user_message=message("run: true")
            )
            async with asyncio.timeout(TIMEOUT):
                async for batch in client.tail_events(cid, start_id=1):
                    if batch.events:
                        latencies.append(time.perf_counter() - began)
                        break
            await client.close_conversation(cid)
    return latencies


async def wait_emitted(sio: RecordingServer, done: Callable[[dict[str, Any]], bool]) -> float:
    async with asyncio.timeout(TIMEOUT):
        while True:
            emitted_at, data = await sio.emitted.get()
            if done(data):
                return emitted_at


def first_agent_event(data: dict[str, Any]) -> bool:
    return data.get("source") == "agent" and "id" in data


def finished(data: dict[str, Any]) -> bool:
    return (
        data.get("observation") == "agent_state_changed"
        and data.get("extras", {}).get("agent_state") == "finished"
    )


def user_settings(llm: FakeLLM) -> Settings:
    return Settings(
        llm_model="openai/gpt-4o",
        llm_api_key=SecretStr("sk-bench"),
        llm_base_url=llm.base_url,
        agent="CodeActAgent",
    )


async def manager_runs(
    manager: Any, sio: RecordingServer, llm: FakeLLM, prefix: str, count: int
) -> tuple[list[float], list[float]]:
    """(start -> first agent event, start -> finished) through a ConversationManager, with
    the connection joined as a browser's would be."""
    firsts, tasks = [], []
    store = await FileConversationStore.get_instance(manager.config, None)
    for n in range(count):
        cid = f"{prefix}-{n}"
        # As OpenHands' route does before it starts a conversation: both managers keep it.
        await store.save_metadata(
            ConversationMetadata(
                conversation_id=cid,
                selected_repository=None,
                title=get_default_conversation_title(cid),
            )
        )
        while not sio.emitted.empty():
            sio.emitted.get_nowait()
        began = time.perf_counter()
        await manager.maybe_start_agent_loop(
            cid, user_settings(llm), None, MessageAction(content="run: echo tiny")
        )
        await manager.join_conversation(cid, f"conn-{cid}", user_settings(llm), None)
        firsts.append(await wait_emitted(sio, first_agent_event) - began)
        tasks.append(await wait_emitted(sio, finished) - began)
        await manager.close_session(cid)
    return firsts, tasks


async def measure(address: str, count: int) -> dict[str, Any]:
    llm = FakeLLM().start()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agents-bench-") as tmp:
        root = Path(tmp)
        workspace = root / "standalone"
        workspace.mkdir()

        warm = Worker(address, root, "warm", fork=True)
        results["first_event_warm"] = latency_summary(
            await remote_first_events(address, llm, "warm", count)
        )
        # Both managers keep conversation metadata in a file store of their own here.
        stores = {"file_store": "local", "file_store_path": str(root / "file-store")}
        sio = RecordingServer()
        manager = RemoteConversationManager(
            sio,
            OpenHandsConfig(**stores),
            InMemoryFileStore(),
            ServerConfig(),
            MonitoringListener(),
            client_settings=ClientSettings(address=address),
        )
        async with manager:
            _, remote_tasks = await manager_runs(manager, sio, llm, "remote", count)
        results["task_remote"] = latency_summary(remote_tasks)

        # Memory: several conversations alive at once, each in its own process.
        running = 4
        async with AsyncConvsvcClient(address=address) as client:
            for n in range(running):
                cid = f"memory-{n}"
                await client.start_conversation(
                    cid, settings=settings_json(llm), initial_user_message=message("run: true")
                )
                async with asyncio.timeout(TIMEOUT):
                    async for batch in client.tail_events(cid):
                        if any(finished(e.payload) for e in batch.events):
                            break
            pids = warm.conversation_pids()
            per_conversation = [pss_kib(pid) for pid in pids]
            results["memory"] = {
                "conversations": len(pids),
                "pss_mib_each": [round(kib / 1024, 1) for kib in per_conversation],
                "pss_mib_mean": sum(per_conversation) / max(len(per_conversation), 1) / 1024,
                "worker_and_zygote_pss_mib": (pss_kib(warm.process.pid) - sum(per_conversation))
                / 1024,
            }
            for n in range(running):
                await client.close_conversation(f"memory-{n}")
        warm.stop()

        cold = Worker(address, root, "cold", fork=False)
        results["first_event_cold"] = latency_summary(
            await remote_first_events(address, llm, "cold", max(count // 2, 1))
        )
        cold.stop()

        # OpenHands' own manager, in this process (its CLI runtime changes this process's
        # cwd: one conversation at a time).
        config = OpenHandsConfig(runtime="cli", workspace_base=str(workspace), **stores)
        sio = RoomRecordingServer()
        standalone = StandaloneConversationManager.get_instance(
            sio, config, InMemoryFileStore(), ServerConfig(), MonitoringListener()
        )
        async with standalone:
            firsts, tasks = await manager_runs(standalone, sio, llm, "standalone", count)
        results["first_event_standalone"] = latency_summary(firsts)
        results["task_standalone"] = latency_summary(tasks)
    llm.stop()
    results["task_ratio"] = results["task_remote"]["p50_ms"] / results["task_standalone"]["p50_ms"]
    return results


if __name__ == "__main__":
    outcome = asyncio.run(measure(sys.argv[1], int(sys.argv[2])))
    print(json.dumps(outcome))
