"""Background work with an owner: a task is started through a :class:`TaskOwner`, which keeps
a reference to it and, when its owner closes, cancels or awaits it. No work is left running
that nobody will wait for."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _retrieve_outcome(task: asyncio.Future[Any]) -> None:
    # Whoever awaited the task saw its error; asyncio must not report it as never retrieved.
    if not task.cancelled():
        task.exception()


class TaskOwner:
    """The tasks one component started and has not yet seen finish."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve_outcome)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait_all(self) -> None:
        """Returns once every task has finished, those started meanwhile included."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel_all(self) -> None:
        """Cancels every task and waits until they have ended."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
