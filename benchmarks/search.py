"""SearchConversations over many stored conversations: pages through a real `convsvc serve`
whose SQLite file holds ``stored`` conversations (bulk-written beside the running server, as
a long-lived deployment accumulates them: 100 per user, labels, titles, agent states and
activity spread over a year)."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from benchmarks.load import CHANNEL_OPTIONS
from benchmarks.processes import Server, convsvc_server, in_process, run_async
from benchmarks.stats import latency_summary
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

PER_USER = 100
TEAMS = 20
STATES = ("finished", "awaiting_user_input", "stopped", "error", "paused")
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def _rows(stored: int, seed: int = 7) -> Any:
    rng = random.Random(seed)
    for n in range(stored):
        created = _EPOCH + timedelta(seconds=rng.randrange(365 * 86400))
        active = created + timedelta(seconds=rng.randrange(30 * 86400))
        team = f"t{rng.randrange(TEAMS)}"
        env = "prod" if rng.random() < 0.5 else "dev"
        labels = {"team": team, "env": env}
        if n % 100_000 == 4242:  # one in 100,000 carries a ticket
            labels["ticket"] = "T-4242"
        state = STATES[rng.randrange(len(STATES))]
        if n % 50_000 == 17:
            state = "awaiting_user_confirmation"
        topic = "report" if rng.random() < 0.1 else "task"
        yield (
            f"conv-{n:07d}",
            f"user-{n // PER_USER:05d}",
            "echo",
            "{}",
            created.isoformat(),
            active.isoformat(),
            json.dumps(labels),
            f"Weekly {topic} {n} for {team}",
            0,
            state,
        )


def fill(database: Path, stored: int) -> float:
    """Writes ``stored`` conversations into the server's SQLite file; returns the seconds."""
    began = time.perf_counter()
    conn = sqlite3.connect(database, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO conversations (conversation_id, user_id, agent, settings, create_time, "
            "last_active_time, labels, title, running, agent_state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _rows(stored),
        )
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return time.perf_counter() - began


QUERIES: dict[str, dict[str, Any]] = {
    "one user, newest": {"user_id": "user-00123", "page_size": 50},
    "one user, label": {"user_id": "user-00123", "labels": {"team": "t3"}},
    "everyone, newest": {"page_size": 100},
    "everyone, two labels": {"labels": {"team": "t7", "env": "prod"}, "page_size": 100},
    "everyone, stopped and finished": {
        "statuses": [pb.CONVERSATION_STATUS_STOPPED],
        "agent_states": ["finished"],
        "page_size": 100,
    },
    "everyone, title contains": {"title_contains": "REPORT", "page_size": 100},
    "everyone, a rare label": {"labels": {"ticket": "T-4242"}, "page_size": 100},
    "everyone, a rare agent state": {"agent_states": ["awaiting_user_confirmation"]},
    "everyone, running": {"statuses": [pb.CONVERSATION_STATUS_RUNNING]},
}


def measure(address: str, rounds: int) -> dict[str, Any]:
    """p50 and p99 of one page for each query, and of the tenth page of the newest."""

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.ConversationServiceStub(channel)
            timings: dict[str, list[float]] = {name: [] for name in QUERIES}
            timings["everyone, newest, 10th page"] = []
            found: dict[str, int] = {}
            for _ in range(rounds):
                for name, query in QUERIES.items():
                    began = time.perf_counter()
                    page = await stub.SearchConversations(pb.SearchConversationsRequest(**query))
                    timings[name].append(time.perf_counter() - began)
                    found[name] = len(page.conversations)
                token = ""
                for _ in range(10):
                    began = time.perf_counter()
                    page = await stub.SearchConversations(
                        pb.SearchConversationsRequest(page_size=100, page_token=token)
                    )
                    token = page.next_page_token
                timings["everyone, newest, 10th page"].append(time.perf_counter() - began)
        pages = {name: latency_summary(values) for name, values in timings.items()}
        return {
            "pages": {
                name: {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]} for name, s in pages.items()
            },
            "found": found,
            "worst_p50_ms": max(s["p50_ms"] for s in pages.values()),
        }

    return run_async(run())


def run(stored: int, rounds: int, progress: Any) -> dict[str, Any]:
    with convsvc_server() as server:
        database = _database(server)
        progress(f"search: writing {stored:,} stored conversations")
        filled = in_process(fill, database, stored)
        progress("search: paging through them")
        result = in_process(measure, server.address, rounds)
    return {"stored": stored, "fill_s": filled, **result}


def _database(server: Server) -> Path:
    return server.log_path.parent / "data" / "convsvc.sqlite3"


if __name__ == "__main__":  # python -m benchmarks.search [stored]: this part alone
    import sys

    stored = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(json.dumps(run(stored, 20, print), indent=1))
