"""The engine's agents by name: the in-process ones and every kind that runs on workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from convsvc.agents import AgentLoop
from convsvc.engine.runtime import ConversationRuntime
from convsvc.workers.loop import WorkerAgentLoop
from convsvc.workers.pool import WorkerPool


class AgentCatalog(Mapping[str, Callable[[ConversationRuntime], AgentLoop]]):
    """The engine's agents by name: built-in ones, then every kind workers run (configured,
    announced by an attached worker, or still used by a conversation waiting for one)."""

    def __init__(
        self,
        in_process: Mapping[str, Callable[[ConversationRuntime], AgentLoop]],
        pool: WorkerPool,
    ) -> None:
        self._in_process = dict(in_process)
        self._pool = pool

    def __getitem__(self, name: str) -> Callable[[ConversationRuntime], AgentLoop]:
        if name in self._in_process:
            return self._in_process[name]
        if self._pool.runs_kind(name):
            pool = self._pool
            return lambda runtime: WorkerAgentLoop(runtime, pool, name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._in_process) | self._pool.kinds()))

    def __len__(self) -> int:
        return len(set(self._in_process) | self._pool.kinds())
