"""convsvc installed without the 'server' extra (the client's install): the command says how
to install the server instead of crashing, and the client imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_client_install_explains_how_to_get_the_server(tmp_path: Path) -> None:
    venv = tmp_path / "client-only"
    uv = os.environ.get("CONVSVC_TEST_UV")  # scripts/test provides it; pip works too, slower
    if uv:
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        install = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*install, "-c", str(ROOT / "constraints.txt"), str(ROOT)], check=True)
    convsvc = str(venv / "bin" / "convsvc")

    assert subprocess.run([convsvc, "--help"], capture_output=True).returncode == 0
    for command in (["serve"], ["health"], ["migrate"]):
        result = subprocess.run([convsvc, *command], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "convsvc[server]" in result.stderr and "Traceback" not in result.stderr
    client = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "from convclient import AsyncConvsvcClient"],
        capture_output=True,
        text=True,
    )
    assert client.returncode == 0, client.stderr
