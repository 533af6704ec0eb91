"""The worker's configuration: ``CONVSVC_WORKER_*`` variables or flags; where convsvc is and
how to reach it are the client's ``CONVSVC_*`` settings (address, token, TLS)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    """What one worker runs, and how."""

    model_config = SettingsConfigDict(env_prefix="CONVSVC_WORKER_", extra="ignore", frozen=True)

    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-worker")
    """Unique among the workers attached to one convsvc (CONVSVC_WORKER_WORKER_ID)."""
    kinds: tuple[str, ...] = ("openhands",)
    """Agent kinds to run: openhands, openhands-sdk, worker-echo (CONVSVC_WORKER_KINDS, a JSON
    list)."""
    capacity: int = Field(4, ge=1)
    """Conversations run at once (CONVSVC_WORKER_CAPACITY)."""
    workspace_root: Path = Path("./convsvc-workspaces")
    """Each conversation works in <workspace_root>/<conversation id> (CLI runtime)."""
    openhands_runtime: str = "cli"
    """OpenHands' runtime for its conversations: cli (needs only bash; one conversation per
    process keeps its cwd and environment apart) or docker (production, needs a Docker
    engine)."""
    allow_client_workspace: bool = False
    """openhands-sdk: work in the directory the client names (``workspace.working_dir``, as a
    stock agent-server does) instead of <workspace_root>/<conversation id>. Only for workers
    whose clients may touch any directory the worker's user can
    (CONVSVC_WORKER_ALLOW_CLIENT_WORKSPACE)."""
    fork: bool = True
    """Fork conversation processes from a zygote that imported the agent once (fast); false
    starts a new interpreter per conversation (slow, for comparison)."""
    stop_grace_seconds: float = Field(10.0, gt=0)
    """How long a stopping conversation process may take before it is killed."""
    reconnect_max_seconds: float = Field(5.0, gt=0)
    """The longest wait between attempts to reach convsvc."""
