"""The engine's agents by name: the in-process ones and every kind that runs on workers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from convsvc.agents import AgentFactory, AgentLoop
from convsvc.workers.loop import WorkerAgentLoop
from convsvc.workers.pool import WorkerPool


class WorkerLoops:
    """Makes the loops of one kind that runs on workers."""

    numbers_own_events: ClassVar[bool] = WorkerAgentLoop.numbers_own_events

    def __init__(self, pool: WorkerPool, kind: str) -> None:
        self._pool = pool
        self._kind = kind

    def __call__(self, context: Any) -> AgentLoop:
        return WorkerAgentLoop(context, self._pool, self._kind)


class AgentCatalog(Mapping[str, AgentFactory]):
    """The engine's agents by name: built-in ones, then every kind workers run (configured,
    announced by an attached worker, or still used by a conversation waiting for one)."""

    def __init__(
        self,
        in_process: Mapping[str, AgentFactory],
        pool: WorkerPool,
    ) -> None:
        self._in_process = dict(in_process)
        self._pool = pool

    def __getitem__(self, name: str) -> AgentFactory:
        if name in self._in_process:
            return self._in_process[name]
        if self._pool.runs_kind(name):
            return WorkerLoops(self._pool, name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._in_process) | self._pool.kinds()))

    def __len__(self) -> int:
        return len(set(self._in_process) | self._pool.kinds())
