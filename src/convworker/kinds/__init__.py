"""The agent loops a worker can run, by kind; each module is imported only where it runs."""

from __future__ import annotations

import importlib

from convworker.kinds.base import Assignment, LoopRunner, Outbox

RUNNERS = {
    "worker-echo": "convworker.kinds.echo:EchoRunner",
    "openhands": "convworker.kinds.openhands:OpenHandsRunner",
}


def preload(kind: str) -> None:
    """Imports a kind's module (the zygote does it once, before forking)."""
    module, _, _ = RUNNERS[kind].partition(":")
    importlib.import_module(module)


def runner_class(kind: str) -> type[LoopRunner]:
    module, _, name = RUNNERS[kind].partition(":")
    cls: type[LoopRunner] = getattr(importlib.import_module(module), name)
    return cls


__all__ = ["RUNNERS", "Assignment", "LoopRunner", "Outbox", "preload", "runner_class"]
