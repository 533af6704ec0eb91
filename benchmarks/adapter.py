"""The adapter row: RemoteConversationManager over gRPC (in an OpenHands venv) against the same
engine driven in-process without gRPC, each timing a user message to its relayed echo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import run_async
from benchmarks.stats import latency_summary

ROOT = Path(__file__).parents[1]


def in_process_engine(count: int) -> dict[str, float]:
    """The same engine and store, called directly: send_event, then the echo on its stream."""
    from convsvc.agents import available_agents
    from convsvc.codec import decode_event
    from convsvc.config import EngineConfig
    from convsvc.domain import StoredEvent
    from convsvc.engine import ConversationEngine
    from convsvc.logs import configure_logging
    from convsvc.storage.sqlite import SqliteStore

    configure_logging("WARNING", "json")  # as the benchmarked server runs

    async def run() -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
            store = SqliteStore(Path(tmp) / "bench.sqlite3")
            await store.open()
            engine = ConversationEngine(EngineConfig(), store, available_agents())
            await engine.start()
            try:
                cid = "adapter-baseline"
                await engine.start_conversation(conversation_id=cid)
                stream = engine.history.stream_events(conversation_id=cid).__aiter__()

                async def echo_of(content: str) -> float:
                    while True:
                        for item in await stream.__anext__():
                            if isinstance(item, StoredEvent):
                                payload = decode_event(item.encoded).payload
                                if payload.get("source") == "agent" and (
                                    payload.get("message") == content
                                ):
                                    return time.perf_counter()

                latencies: list[float] = []
                began = time.perf_counter()
                for n in range(count + 20):
                    content = f"baseline-{n}"
                    sent_at = time.perf_counter()
                    await engine.send_event(
                        conversation_id=cid,
                        event={"action": "message", "args": {"content": content}},
                    )
                    echoed_at = await echo_of(content)
                    if n == 19:
                        began = time.perf_counter()
                    if n >= 20:
                        latencies.append(echoed_at - sent_at)
                elapsed = time.perf_counter() - began
            finally:
                await engine.stop()
                await store.close()
        return {"messages_per_s": count / elapsed, **latency_summary(latencies)}

    return run_async(run())


def remote_manager(openhands_python: Path, address: str, count: int) -> dict[str, Any]:
    return _in_openhands(openhands_python, "benchmarks.adapter_remote", address, count)


def openhands_agents(
    openhands_python: Path, address: str, convsvc_pid: int, rounds: int
) -> dict[str, Any]:
    """OpenHands' web server with its own manager against RemoteConversationManager, in the
    OpenHands release of that venv."""
    return _in_openhands(openhands_python, "benchmarks.agents_web", address, convsvc_pid, rounds)


def agent_server_api(sdk_python: Path, rounds: int) -> dict[str, Any]:
    """The agent-server API: stock against convsvc (convsvc from this venv)."""
    convsvc = Path(sys.executable).parent / "convsvc"
    return _in_openhands(
        sdk_python, "benchmarks.agent_server", rounds, CONVSVC_SERVER_BIN=str(convsvc)
    )


def _in_openhands(
    openhands_python: Path, module: str, *arguments: object, **env: str
) -> dict[str, Any]:
    finished = subprocess.run(
        [str(openhands_python), "-m", module, *map(str, arguments)],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("CONVSVC_")},
            "SERVE_FRONTEND": "false",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if finished.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{finished.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result
