"""The agent-server API (OpenHands 1.x) as its users meet it: the SDK's RemoteConversation
against a stock agent-server 1.58.2 and against convsvc with an openhands-sdk worker, the
same scripted LLM answering both, the two taking turns round by round.

``python -m benchmarks.agent_server ROUNDS`` runs in the SDK's venv (Python 3.12) with
CONVSVC_SERVER_BIN naming convsvc's console script, and prints JSON:
- ``first_event``: create with a tiny task ("run: echo ...") -> the client has the
  conversation's first event;
- ``task``: the same create -> the client has the agent's ``finish``;
- ``follow_up``: ``send_message`` + ``run()`` -> ``run()`` returns (the SDK's own wait for
  the post-run state);
- ``memory``: PSS per running conversation: a stock agent-server process with one
  conversation (one agent-server per conversation, as sandboxes run them), the growth per
  conversation inside one stock server, and the growth of convsvc with its worker's process
  tree per conversation; and how many conversations that memory allows on this machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import latency_summary
from benchmarks.tree import pss_kib
from tests.agent_server import sdk
from tests.agent_server.conftest import (
    Backend,
    Recorder,
    start_convsvc,
    start_stock,
    start_worker,
)
from tests.agent_server.fake_llm import SdkFakeLLM
from tests.openhands.conftest import stop_process

RUNNING = 3
"""Conversations kept running for the memory growth figures."""


class TimedRecorder(Recorder):  # type: ignore[misc]
    """Notes when each event reached the client."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        self.arrived.setdefault(event.id, time.monotonic())
        super().__call__(event)


def _is_event(event: Any) -> bool:
    return type(event).__name__ != "ConversationStateUpdateEvent"


class Side:
    def __init__(self, backend: Backend, llm: SdkFakeLLM, root: Path) -> None:
        self.backend = backend
        self.llm = llm
        self.root = root
        self.first_event: list[float] = []
        self.task: list[float] = []
        self.follow_up: list[float] = []

    def round(self, n: int, measured: bool) -> None:
        began = time.monotonic()
        timed = TimedRecorder()
        conversation, _ = sdk.start(
            self.backend,
            self.llm,
            str(self.root / f"round-{n}"),
            initial=f"run: echo {self.backend.name}-{n}",
            recorder=timed,
        )
        created = time.monotonic()
        timed.wait_for(sdk.is_finish, "finish")

        def arrival(found: Any) -> float:
            # Events synced over REST while the socket subscribed arrived with the create.
            return timed.arrived.get(found.id, created)

        first = min(arrival(e) for e in conversation.state.events if _is_event(e))
        finish = next(e for e in conversation.state.events if sdk.is_finish(e))
        sent = time.monotonic()
        conversation.send_message(f"run: echo {self.backend.name}-{n}-again")
        conversation.run()
        again = time.monotonic()
        if measured:
            self.first_event.append(first - began)
            self.task.append(arrival(finish) - began)
            self.follow_up.append(again - sent)
        conversation.delete_on_close = True
        conversation.close()

    def results(self) -> dict[str, Any]:
        return {
            "first_event": latency_summary(self.first_event),
            "task": latency_summary(self.task),
            "follow_up": latency_summary(self.follow_up),
        }

    def keep_running(self, count: int) -> list[Any]:
        kept = []
        for n in range(count):
            conversation, recorder = sdk.start(
                self.backend, self.llm, str(self.root / f"kept-{n}"), initial="run: echo kept"
            )
            recorder.wait_for(sdk.is_finish, "finish")
            kept.append(conversation)
        return kept


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(rounds: int) -> dict[str, Any]:
    llm = SdkFakeLLM()
    llm.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-agent-server-") as tmp:
            return measure_in(Path(tmp), rounds, llm)
    finally:
        llm.stop()


def measure_in(root: Path, rounds: int, llm: SdkFakeLLM) -> dict[str, Any]:
    stock_backend, stock_process = start_stock(root / "stock")
    server, url = start_convsvc(root / "convsvc")
    worker = start_worker(root / "convsvc", server.address, "bench-worker", capacity=RUNNING + 2)
    ours = Backend("convsvc", url, convsvc=server)
    sides = [Side(stock_backend, llm, root / "stock-ws"), Side(ours, llm, root / "convsvc-ws")]
    assert server.process is not None
    try:
        for side in sides:
            side.round(0, measured=False)  # first-use costs on both sides
        for n in range(1, rounds + 1):
            for side in sides if n % 2 else list(reversed(sides)):
                side.round(n, measured=True)
        results: dict[str, Any] = {side.backend.name: side.results() for side in sides}

        # Memory: one stock server with one conversation, as one agent-server per
        # conversation runs; the growth per conversation inside one stock server; convsvc.
        alone_root = root / "stock-alone"
        alone, alone_process = start_stock(alone_root)
        kept = Side(alone, llm, alone_root / "ws").keep_running(1)
        one_server = pss_kib(alone_process.pid) / 1024
        for conversation in kept:
            conversation.close()
        stop_process(alone_process)

        def growth(side: Side, pids: list[int]) -> float:
            before = sum(pss_kib(pid) for pid in pids)
            conversations = side.keep_running(RUNNING)
            after = sum(pss_kib(pid) for pid in pids)
            for conversation in conversations:
                conversation.delete_on_close = True
                conversation.close()
            return (after - before) / RUNNING / 1024

        stock_growth = growth(sides[0], [stock_process.pid])
        convsvc_growth = growth(sides[1], [server.process.pid, worker.process.pid])
        available = mem_available_mib()
        results["memory"] = {
            "stock_server_per_conversation_mib": one_server,
            "stock_growth_per_conversation_mib": stock_growth,
            "convsvc_growth_per_conversation_mib": convsvc_growth,
            "mem_available_mib": available,
            "conversations_per_machine": {
                "stock_one_server_each": int(available / one_server) if one_server else 0,
                "convsvc": int(available / convsvc_growth) if convsvc_growth > 0 else 0,
            },
        }
        results["rounds"] = rounds
        return results
    finally:
        stop_process(worker.process)
        server.stop()
        stop_process(stock_process)


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10)))
