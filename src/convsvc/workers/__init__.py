"""Agent workers: processes that attach over the worker protocol and run agent loops.

``pool`` tracks the attached workers and assigns conversations to them; ``loop`` is the
engine's side of a conversation that runs on a worker.
"""

from convsvc.workers.pool import AgentCatalog, WorkerPool, WorkerSession

__all__ = ["AgentCatalog", "WorkerPool", "WorkerSession"]
