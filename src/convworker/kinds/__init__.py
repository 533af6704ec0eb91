"""The agent loops a worker can run, by kind; each module is imported only where it runs."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from convworker.kinds.base import Assignment, LoopRunner, Outbox

RUNNERS = {
    "worker-echo": "convworker.kinds.echo:EchoRunner",
    "openhands": "convworker.kinds.openhands:OpenHandsRunner",
    "openhands-sdk": "convworker.kinds.openhands_sdk:AgentServerRunner",
}
ENVIRONMENT = {
    # litellm would download its price list at import (no network here, a delay elsewhere).
    "openhands": {"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    "openhands-sdk": {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENHANDS_SUPPRESS_BANNER": "1"},
}
"""Variables a kind's conversation processes start with, unless the worker's environment
sets them."""


def process_environment(kinds: Iterable[str], base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a process that runs ``kinds``: ``base`` plus the kinds' defaults."""
    env = {name: value for kind in kinds for name, value in ENVIRONMENT.get(kind, {}).items()}
    return {**env, **base}


def preload(kind: str) -> None:
    """Imports a kind's module and lets it warm up (the zygote does it once, before
    forking, so every conversation process starts warm)."""
    module, _, _ = RUNNERS[kind].partition(":")
    warm_up = getattr(importlib.import_module(module), "warm_up", None)
    if warm_up is not None:
        warm_up()


def runner_class(kind: str) -> type[LoopRunner]:
    module, _, name = RUNNERS[kind].partition(":")
    cls: type[LoopRunner] = getattr(importlib.import_module(module), name)
    return cls


__all__ = [
    "RUNNERS",
    "Assignment",
    "LoopRunner",
    "Outbox",
    "preload",
    "process_environment",
    "runner_class",
]
