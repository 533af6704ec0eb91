"""Prometheus metrics: one registry per server, made by the app and handed to what records.

Calls, commits, forwards and takeovers are counted as they happen; the node's state
(conversations, connections, subscribers, workers) is read when Prometheus scrapes, so
nothing on the hot path updates a gauge. Nothing here is global: a test gets a registry of
its own with every server it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric


@dataclass(frozen=True)
class EngineGauges:
    """What the engine holds now."""

    conversations_by_status: dict[str, int]
    """By phase: starting, running, closing."""
    conversations_by_agent_state: dict[str, int]
    connections: int
    stream_subscribers: int
    stream_lag_events: int
    """The most events any live subscriber has waiting (how far the slowest is behind)."""
    watchers: int
    """WatchConversations streams reading this node's changes."""
    queued_starts: int
    """Starts waiting in the admission queue."""


@dataclass(frozen=True)
class WorkerGauges:
    """The agent workers attached now."""

    workers: int
    waiting_loops: int
    """Loops waiting for a worker with room."""
    slots: dict[str, tuple[int, int]]
    """(capacity, free) by agent kind."""


class Metrics:
    """The server's registry and the instruments updated as things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.rpc_calls = Counter(
            "convsvc_rpc_calls_total", "RPCs handled", ["method", "code"], registry=registry
        )
        self.rpc_seconds = Histogram(
            "convsvc_rpc_seconds",
            "Time to answer unary RPCs",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )
        self.commit_events = Histogram(
            "convsvc_commit_batch_events",
            "Events committed together in one transaction (group commit)",
            ["backend"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "convsvc_commit_seconds",
            "Time to commit one batch, until durable",
            ["backend"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
            registry=registry,
        )
        self.cluster_takeovers = Counter(
            "convsvc_cluster_takeovers_total",
            "Conversations this node took over (their owner died, or handed them over)",
            registry=registry,
        )
        self.cluster_forwards = Counter(
            "convsvc_cluster_forwards_total",
            "Calls this node forwarded to the node that runs their conversation",
            ["method", "code"],
            registry=registry,
        )

    def serve(
        self,
        listen: str,
        engine: Callable[[], EngineGauges],
        workers: Callable[[], WorkerGauges],
        followed: Callable[[], int] | None = None,
    ) -> Any:
        """Serves /metrics on ``listen`` (host:port) with the process's own metrics and the
        node's state read at scrape time; returns the HTTP server (``shutdown()`` stops it).
        ``followed``: in a cluster, how many conversations the node follows.

        Called on the event loop, whose state the readers read: the HTTP server scrapes on a
        thread of its own, so each read is run on the loop (never beside its changes)."""
        loop = asyncio.get_running_loop()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(
            NodeCollector(
                on_loop(loop, engine),
                on_loop(loop, workers),
                on_loop(loop, followed) if followed is not None else None,
            )
        )
        host, port = listen.rsplit(":", 1)
        server, _ = start_http_server(int(port), addr=host, registry=self.registry)
        return server


T = TypeVar("T")
SCRAPE_TIMEOUT_SECONDS = 5.0


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], T]) -> Callable[[], T]:
    """``read``, callable from another thread: it runs on ``loop`` and its answer (or
    error) is handed back, within SCRAPE_TIMEOUT_SECONDS."""

    def call() -> T:
        answer: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                answer.set_result(read())
            except BaseException as exc:  # handed to the scraping thread, which reports it
                answer.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return answer.result(SCRAPE_TIMEOUT_SECONDS)

    return call


class NodeCollector:
    """The node's live state, collected at scrape time (a Prometheus custom collector)."""

    def __init__(
        self,
        engine: Callable[[], EngineGauges],
        workers: Callable[[], WorkerGauges],
        followed: Callable[[], int] | None,
    ) -> None:
        self._engine = engine
        self._workers = workers
        self._followed = followed

    def collect(self) -> Iterator[Metric]:
        gauges = self._engine()
        by_status = GaugeMetricFamily(
            "convsvc_conversations",
            "Conversations whose loop runs on this node, by status",
            labels=["status"],
        )
        for status in ("starting", "running", "closing"):
            by_status.add_metric([status], gauges.conversations_by_status.get(status, 0))
        yield by_status
        by_state = GaugeMetricFamily(
            "convsvc_conversations_by_agent_state",
            "Conversations whose loop runs on this node, by agent state",
            labels=["agent_state"],
        )
        for state, count in sorted(gauges.conversations_by_agent_state.items()):
            by_state.add_metric([state], count)
        yield by_state
        yield GaugeMetricFamily(
            "convsvc_connections", "Connections held on this node", value=gauges.connections
        )
        yield GaugeMetricFamily(
            "convsvc_stream_subscribers",
            "Live event streams on this node",
            value=gauges.stream_subscribers,
        )
        yield GaugeMetricFamily(
            "convsvc_stream_lag_events",
            "Events the slowest live stream has waiting to be sent",
            value=gauges.stream_lag_events,
        )
        yield GaugeMetricFamily(
            "convsvc_watchers",
            "WatchConversations streams reading this node's changes",
            value=gauges.watchers,
        )
        yield GaugeMetricFamily(
            "convsvc_queued_starts",
            "Starts waiting for room under their user's limit (admission policy queue)",
            value=gauges.queued_starts,
        )
        if self._followed is not None:
            yield GaugeMetricFamily(
                "convsvc_cluster_followed_conversations",
                "Conversations run elsewhere whose events this node follows for its streams",
                value=self._followed(),
            )
        workers = self._workers()
        yield GaugeMetricFamily(
            "convsvc_workers", "Agent workers attached to this node", value=workers.workers
        )
        yield GaugeMetricFamily(
            "convsvc_worker_waiting_loops",
            "Loops waiting for a worker with room",
            value=workers.waiting_loops,
        )
        capacity = GaugeMetricFamily(
            "convsvc_worker_slots", "Worker slots by agent kind", labels=["kind", "state"]
        )
        for kind, (total, free) in sorted(workers.slots.items()):
            capacity.add_metric([kind, "free"], free)
            capacity.add_metric([kind, "busy"], total - free)
        yield capacity
