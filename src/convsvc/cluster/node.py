"""This node's membership of the cluster: heartbeat, leases, takeover and the directory.

The node's heartbeat row renews every lease it holds (database clock). A node whose heartbeat
is older than the lease TTL is dead: every live node scans for running conversations whose
owner is dead (or that were handed over) and claims them, which starts their loops here from
the log. A claim bumps the conversation's epoch, and every append is fenced on it, so a node
that was only paused can write nothing once it wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Sequence

import structlog

from convsvc.config import ClusterConfig
from convsvc.domain import Connection, ConversationRecord
from convsvc.engine import ConversationEngine
from convsvc.engine.visibility import out_of_scope
from convsvc.errors import ConvsvcError, FailedPrecondition, ResourceExhausted, Unavailable
from convsvc.metrics import Metrics
from convsvc.storage import StorageError
from convsvc.storage.postgres import OwnedElsewhere, Owner, PostgresStore
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.workers import WorkerPool

log = structlog.get_logger(__name__)

SetServing = Callable[[bool], Awaitable[None]]
EvictRemote = Callable[[str, Owner], Awaitable[None]]

_CLAIM_ATTEMPTS = 10
"""Evict-then-claim rounds before a start gives up (other starts keep taking the room)."""


def owner_moved(conversation_id: str, owner: Owner | None) -> Unavailable:
    """UNAVAILABLE/OWNER_MOVED, with the owner's address for the client to call."""
    metadata = {"conversation_id": conversation_id}
    if owner is not None and owner.address:
        metadata["owner_address"] = owner.address
    where = f"node {owner.address}" if owner is not None and owner.address else "another node"
    return Unavailable(
        f"conversation {conversation_id} runs on {where}; call that node",
        reason="OWNER_MOVED",
        metadata=metadata,
    )


class ClusterNode:
    """Implements the engine's Membership on PostgreSQL and runs the node's background work."""

    def __init__(
        self,
        config: ClusterConfig,
        store: PostgresStore,
        directory: PostgresDirectory,
        engine: ConversationEngine,
        address: str,
        *,
        limit: int,
        in_process_agents: Collection[str],
        workers: WorkerPool,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._directory = directory
        self._takeovers = metrics.cluster_takeovers
        self._in_process_agents = frozenset(in_process_agents)
        self._workers = workers
        self._store = store
        self._engine = engine
        self.address = address
        self._limit = limit
        self._readopt: set[str] = set()
        self._pending_releases: dict[str, bool] = {}
        """Leases of loops that ended here but could not be released yet (keep_running)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._set_serving: SetServing | None = None
        self._evict_remote: EvictRemote | None = None
        self._serving = True
        self.database_reachable = True

    @property
    def node_id(self) -> str:
        return self._store.node_id

    def start(self, set_serving: SetServing, evict_remote: EvictRemote) -> None:
        """Starts the heartbeat and the takeover scan (after the first heartbeat)."""
        self._set_serving = set_serving
        self._evict_remote = evict_remote
        self._engine.join_cluster(self)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="cluster-heartbeat"),
            asyncio.create_task(self._takeover_loop(), name="cluster-takeover"),
            asyncio.create_task(self._crash_watch_loop(), name="cluster-crash-watch"),
        ]

    async def register(self) -> None:
        """The first heartbeat: the node is in the cluster once this returns. Its liveness
        lock comes first, so that peers never see it registered without one."""
        sent = time.monotonic()
        await self._directory.hold_liveness_lock()
        await self._directory.heartbeat_node(self.address, sorted(self._worker_kinds()))
        self._store.leases_valid_until = sent + self._config.lease_ttl_seconds
        log.info("cluster.joined", node_id=self.node_id, address=self.address)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def leave(self) -> None:
        """Marks this node dead at once, so what it still owns is taken over now."""
        try:
            await self._directory.leave_cluster()
        except StorageError as exc:
            log.warning("cluster.leave_failed", error=str(exc))
        await self._directory.release_liveness_lock()

    # -- Membership ----------------------------------------------------------------------

    async def claim(
        self, record: ConversationRecord, *, take_over: bool, may_stop: frozenset[str] | None
    ) -> None:
        cid = record.conversation_id
        for attempt in range(_CLAIM_ATTEMPTS):
            try:
                claim = await self._store.claim(
                    record, address=self.address, limit=self._limit, take_over=take_over
                )
            except OwnedElsewhere as exc:
                raise owner_moved(cid, exc.owner) from None
            if claim.epoch is not None:
                self._readopt.discard(cid)
                if claim.took_over:
                    log.info("cluster.claimed", conversation_id=cid, epoch=claim.epoch)
                return
            if take_over:  # it was closed meanwhile
                raise FailedPrecondition(
                    f"conversation {cid} is not running; start or join it first",
                    reason="CONVERSATION_NOT_RUNNING",
                    metadata={"conversation_id": cid},
                )
            if attempt == _CLAIM_ATTEMPTS - 1:
                break  # evicting now would stop a conversation for a start that gives up
            # The user is at the limit: the oldest running conversations stop first, if the
            # caller may stop them.
            for victim, _ in claim.victims:
                out_of_scope(may_stop, victim, f"starting {cid} would stop")
            await asyncio.gather(*(self._evict(victim, owner) for victim, owner in claim.victims))
        raise ResourceExhausted(
            "other starts keep taking the room freed under the per-user limit; retry",
            reason="TOO_MANY_CONVERSATIONS",
            metadata={"limit": str(self._limit)},
        )

    async def _evict(self, conversation_id: str, owner: Owner) -> None:
        if owner.node_id == self.node_id and await self._engine.evict(conversation_id):
            return
        if owner.alive and owner.node_id is not None and owner.node_id != self.node_id:
            assert self._evict_remote is not None
            await self._evict_remote(conversation_id, owner)
            return
        # Nobody runs it (its owner died, or it was being handed over): stop it in place.
        await self._store.stop_orphan(conversation_id)

    async def release(self, conversation_id: str, *, keep_running: bool) -> None:
        try:
            await self._store.release(conversation_id, keep_running=keep_running)
        except StorageError as exc:
            # The loop has ended here; until the lease says so, this node must not take the
            # conversation up again (a closed one would come back). Retried by the scan.
            self._pending_releases[conversation_id] = keep_running
            log.warning("cluster.release_deferred", conversation_id=conversation_id, error=str(exc))

    async def _retry_releases(self) -> None:
        for cid, keep_running in list(self._pending_releases.items()):
            await self._store.release(cid, keep_running=keep_running)
            del self._pending_releases[cid]

    def lost(self, conversation_id: str, *, readopt: bool) -> None:
        self._store.forget_lease(conversation_id)
        if readopt:
            self._readopt.add(conversation_id)

    async def find_connection(self, connection_id: str) -> Connection | None:
        return await self._directory.find_connection(connection_id)

    async def connection_added(self, connection: Connection) -> None:
        await self._directory.put_connection(connection)

    async def connections_removed(self, connection_ids: Sequence[str]) -> None:
        await self._directory.drop_connections(connection_ids)

    async def instances_alive(self, instance_ids: Sequence[str], within: float) -> set[str]:
        return await self._directory.instances_seen_within(instance_ids, within)

    # -- background work -------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        # A heartbeat that takes longer than this says the database is out of reach (a
        # partition drops packets: nothing fails, everything waits).
        patience = self._config.lease_ttl_seconds / 2
        while True:
            await asyncio.sleep(self._config.heartbeat_interval_seconds)
            sent = time.monotonic()
            try:
                async with asyncio.timeout(patience):
                    await self._directory.hold_liveness_lock()  # again, if its session was lost
                    await self._directory.heartbeat_node(self.address, sorted(self._worker_kinds()))
            except (StorageError, TimeoutError) as exc:
                self._store.heartbeats_failing = True
                if self.database_reachable:
                    log.error("cluster.database_unreachable", error=str(exc))
                self.database_reachable = False
                await self._report(serving=False)
                continue
            # The database's clock renewed the leases no earlier than this was sent.
            self._store.leases_valid_until = sent + self._config.lease_ttl_seconds
            self._store.heartbeats_failing = False
            if not self.database_reachable:
                log.info("cluster.database_back")
            self.database_reachable = True
            await self._report(serving=True)

    async def _report(self, *, serving: bool) -> None:
        if serving != self._serving and self._set_serving is not None:
            self._serving = serving
            await self._set_serving(serving)

    async def _crash_watch_loop(self) -> None:
        """Takes over, at once, what nodes that crashed (their liveness lock released with
        their process) held: no waiting out their lease."""
        while True:
            await asyncio.sleep(self._config.crash_check_seconds)
            try:
                crashed = await self._directory.expire_crashed_nodes()
                if crashed:
                    log.warning("cluster.node_crashed", node_ids=crashed)
                    await self.take_over_orphans()
            except StorageError as exc:
                log.warning("cluster.crash_check_failed", error=str(exc))

    async def _takeover_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.takeover_scan_seconds)
            if not self.database_reachable:
                continue
            try:
                await self.take_over_orphans()
            except StorageError as exc:
                log.warning("cluster.takeover_scan_failed", error=str(exc))

    async def take_over_orphans(self) -> int:
        """Claims running conversations nobody runs; returns how many this node took."""
        await self._retry_releases()
        records = await self._store.orphans(self._config.takeover_batch)
        for cid in list(self._readopt):
            # Tried once more: if another node owns it now, or it stopped, that is final.
            self._readopt.discard(cid)
            if not self._engine.queries.runs_here(cid):
                record = await self._store.get_conversation(cid)
                if record is not None:
                    records.append(record)
        taken = 0
        for record in records:
            if await self.placement(record.agent) is not None:
                continue  # a node whose workers have room for it takes it over
            try:
                await self._take_over(record)
                taken += 1
            except StorageError as exc:
                self._readopt.add(record.conversation_id)  # the database is away: later
                log.info("cluster.takeover_deferred", error=str(exc))
            except ConvsvcError as exc:
                # Another node was quicker, or the conversation stopped meanwhile.
                log.info(
                    "cluster.takeover_skipped",
                    conversation_id=record.conversation_id,
                    reason=exc.reason,
                )
        if taken:
            log.info("cluster.took_over", count=taken)
        return taken

    def _worker_kinds(self) -> set[str]:
        return self._workers.kinds_with_room()

    async def placement(self, agent: str) -> Owner | None:
        """Another live node to run a new loop of ``agent`` on, when this node has no
        room for it now and that node's workers do; None to run it here."""
        if agent in self._in_process_agents or agent in self._workers.kinds_with_room():
            return None
        for node_id, address in await self._directory.nodes_running(agent):
            if node_id != self.node_id:
                return Owner(node_id, address, True)
        return None  # nobody has room: it waits here for a worker, as on one node

    async def adopt(self, conversation_id: str, *, may_place_elsewhere: bool) -> Owner | None:
        """Takes over one conversation whose owner is gone, at a caller's request; or, when
        its agent runs on workers that this node has no room for and another node's have
        (and the call was not placed here by a peer already), names that node: the call
        goes there, and that node takes the conversation over. Taken here, it would wait
        for a worker that never comes."""
        if conversation_id in self._pending_releases:
            return None  # its loop ended here; the lease is released once the database lets
        record = await self._store.get_conversation(conversation_id)
        if record is None:
            return None
        if may_place_elsewhere:
            elsewhere = await self.placement(record.agent)
            if elsewhere is not None:
                return elsewhere
        await self._take_over(record)
        return None

    async def _take_over(self, record: ConversationRecord) -> None:
        if await self._engine.take_over(record):
            self._takeovers.inc()
        # Connections made through the old owner live on: the client's next send by
        # connection id reaches this node.
        self._engine.adopt_connections(await self._directory.connections_of(record.conversation_id))
