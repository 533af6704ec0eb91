"""The Node.js project the polyglot tests run (npm packages installed once per session)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NODE_PROJECT = Path(__file__).parent / "node"
PROTOS = Path(__file__).parents[2] / "protos"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The Node project with its npm packages installed (exact versions, no lock file)."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is needed for the polyglot test (Node.js 18+)"
    subprocess.run(
        ["npm", "install", "--no-package-lock", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_PROJECT,
        check=True,
        timeout=300,
    )
    return NODE_PROJECT / "client.mjs"
