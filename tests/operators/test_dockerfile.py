"""No Docker engine runs here, so the image's steps are kept to those the tests exercise: the
README's install line, `convsvc serve` (every service test) and `convsvc health`."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
INSTALL = "pip install -c constraints.txt '.[server]'"


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        match = re.match(r"^([A-Z]+)\s+(.*)$", line.strip())
        if match:
            found.append((match[1], match[2]))
    return found


def test_the_image_installs_as_the_readme_says() -> None:
    assert INSTALL in (ROOT / "README.md").read_text()
    runs = [args for op, args in instructions() if op == "RUN"]
    assert INSTALL in runs


def test_the_image_copies_everything_the_install_needs() -> None:
    copied = " ".join(args for op, args in instructions() if op == "COPY")
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "src"):
        assert needed in copied
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!constraints.txt", "!README.md", "!src/"):
        assert needed in ignored


def test_the_image_serves_and_checks_health_with_the_tested_commands() -> None:
    ops = dict(instructions())
    assert json.loads(ops["ENTRYPOINT"]) == ["convsvc", "serve"]
    assert ops["HEALTHCHECK"].endswith('CMD ["convsvc", "health"]')
    assert any("CONVSVC_LISTEN=0.0.0.0:50051" in args for op, args in instructions() if op == "ENV")
