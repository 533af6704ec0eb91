"""Agent workers: processes that attach over the worker protocol and run agent loops.

``pool`` tracks the attached workers and assigns conversations to them, ``loop`` is the
engine's side of a conversation that runs on a worker, ``messages`` what passes between them,
and ``catalog`` lists every agent the engine can start.
"""

from convsvc.workers.catalog import AgentCatalog
from convsvc.workers.pool import WorkerPool, WorkerSession

__all__ = ["AgentCatalog", "WorkerPool", "WorkerSession"]
