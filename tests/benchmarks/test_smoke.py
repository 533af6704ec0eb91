"""A toy-sized run of the benchmark harness: every scenario with real processes, every figure
in the JSON, the chart written. Speed is not asserted here; scripts/bench measures it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


# About 85 s alone; with the OpenHands suites running beside it, more than the default limit.
@pytest.mark.timeout(600)
def test_quick_run_writes_every_figure(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        env={k: v for k, v in os.environ.items() if k != "CONVSVC_BENCH_OPENHANDS_PYTHON"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert "| goal | measured | target | against (same run) | met |" in finished.stdout
    steps = (
        "floor and send",
        "round trip",
        "floor streams",
        "disk:",
        "catch-up:",
        "fan-out:",
        "scale:",
        "search:",
    )
    for step in (*steps, "Connect stream", "durability:", "worker relay:", "cluster: takeover"):
        assert step in finished.stderr  # progress is shown while it runs

    results = json.loads((tmp_path / "benchmarks.json").read_text())
    figures = {
        ("floor", "unary_1", "calls_per_s"),
        ("floor", "unary_16", "p99_ms"),
        ("floor", "durable_1", "p50_ms"),
        ("floor", "durable_16", "calls_per_s"),
        ("floor", "stream_unbatched", "items_per_s"),
        ("floor", "stream_batched", "items_per_s"),
        ("send", "send_1", "calls_per_s"),
        ("send", "send_16", "p99_ms"),
        ("send", "round_trip", "p50_ms"),
        ("send", "connect_round_trip", "p50_ms"),
        ("catch_up", "events_per_s"),
        ("fan_out", "deliveries_per_s"),
        ("fan_out", "p99_delay_ms"),
        ("scale", "starts_per_s"),
        ("scale", "kib_per_conversation"),
        ("scale", "page_p50_ms"),
        ("search", "worst_p50_ms"),
        ("search", "pages", "everyone, a rare label", "p50_ms"),
        ("durability", "ratio"),
        ("worker_relay", "events_per_s"),
        ("disk_sync", "fsync", "p50_ms"),
        ("disk_sync", "normal_send_16", "calls_per_s"),
        ("disk_sync", "normal_round_trip", "p50_ms"),
        ("cluster", "postgres_floor", "appends_per_s_16"),
        ("cluster", "send_forwarded_16", "calls_per_s"),
        ("cluster", "round_trip_forwarded", "p50_ms"),
        ("cluster", "aggregate", "postgres_3_nodes"),
        ("cluster", "takeover", "max_s"),
        ("cluster", "scale", "sqlite", "starts_per_s"),
        ("cluster", "scale", "cluster", "user_list_p50_ms_at_scale"),
        ("cluster", "client_send_16", "routing", "calls_per_s"),
        ("cluster", "ratios", "routing_client_16"),
    }
    for path in figures:
        value = results
        for key in path:
            value = value[key]
        assert isinstance(value, float | int) and math.isfinite(value) and value > 0, path
    # Quick: one round of the floors and convsvc taking turns, for calls and for streams.
    assert [len(results["rounds"][part]) for part in ("calls", "streams")] == [1, 1]
    assert results["catch_up"]["events"] >= 2_000  # the tail read the whole log
    assert results["agents"]["status"].startswith("not measured")  # no OpenHands venv here
    assert results["fan_out"]["deliveries"] == 20 * 4 * 3  # every subscriber got every event
    names = {goal["name"] for goal in results["goals"]}
    assert {"catch-up / batched stream floor", "fan-out"} <= names
    assert "cluster: routing client's send / to the owner, 16 in flight" in names
    # Every goal names what it was measured against, except the absolute ones.
    absolute = {
        "fan-out",
        "memory per running echo conversation",
        "takeover after kill -9 (p50)",
        "takeover after kill -9 (p99)",
    }
    assert results["search"]["stored"] == 2_000
    assert results["search"]["found"]["everyone, newest"] == 100  # pages are full
    for goal in results["goals"]:
        assert (
            goal["against"]
            or goal["name"] in absolute
            or "list page" in goal["name"]
            or goal["name"].startswith("search:")
        ), goal
    tenths = results["cluster"]["scale"]["cluster"]["starts_per_s_by_tenth"]
    assert len(tenths) == 10 and all(rate > 0 for rate in tenths)
    takeover = results["cluster"]["takeover"]
    assert takeover["acknowledged"] == 40 and takeover["lost"] == 0  # through a kill -9
    assert results["cluster"]["scale"]["cluster"]["stored"] == 2_000
    assert "adapter" in results  # measured when an OpenHands venv is given (scripts/bench)
    assert (tmp_path / "benchmarks.png").read_bytes().startswith(b"\x89PNG")
