"""Prometheus metrics beyond the per-method RED counters of ``transport.service``.

State (conversations, connections, subscribers, workers) is read from the engine and the
worker pool when Prometheus scrapes, so nothing on the hot path updates a gauge; commit
batches are observed by the store as they commit (``storage.group_commit``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY

from convsvc.engine import ConversationEngine
from convsvc.workers import WorkerPool


class NodeCollector:
    """The node's live state, collected at scrape time (a Prometheus custom collector)."""

    def __init__(
        self,
        engine: ConversationEngine,
        workers: WorkerPool,
        followed: Callable[[], int] | None = None,
    ) -> None:
        self._engine = engine
        self._workers = workers
        self._followed = followed

    def collect(self) -> Iterator[Metric]:
        gauges = self._engine.gauges()
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
        workers = list(self._workers.workers())
        yield GaugeMetricFamily(
            "convsvc_workers", "Agent workers attached to this node", value=len(workers)
        )
        yield GaugeMetricFamily(
            "convsvc_worker_waiting_loops",
            "Loops waiting for a worker with room",
            value=self._workers.waiting_count,
        )
        capacity = GaugeMetricFamily(
            "convsvc_worker_slots", "Worker slots by agent kind", labels=["kind", "state"]
        )
        for kind, (total, free) in sorted(self._workers.slots().items()):
            capacity.add_metric([kind, "free"], free)
            capacity.add_metric([kind, "busy"], total - free)
        yield capacity


def register(
    engine: ConversationEngine,
    workers: WorkerPool,
    followed: Callable[[], int] | None = None,
) -> NodeCollector:
    """Adds the node's collector to the default registry (the one /metrics serves);
    ``followed``: in a cluster, how many conversations the node follows."""
    collector = NodeCollector(engine, workers, followed)
    REGISTRY.register(collector)
    return collector


def unregister(collector: NodeCollector) -> None:
    REGISTRY.unregister(collector)
