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


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (``FROM ... AS name`` to the next FROM)."""
    found: list[tuple[str, str]] = []
    inside = False
    for op, args in instructions():
        if op == "FROM":
            inside = args.endswith(f" AS {name}")
        elif inside:
            found.append((op, args))
    return found


def test_the_worker_image_installs_and_runs_what_the_worker_tests_run() -> None:
    worker = stage("worker")
    runs = " ".join(args for op, args in worker if op == "RUN")
    # scripts/worker's install: this checkout with the pinned OpenHands release.
    assert '-c "constraints-openhands-${OPENHANDS_VERSION}.txt" .' in runs
    assert '"openhands-ai==${OPENHANDS_VERSION}.0"' in runs
    assert "-e ." in (ROOT / "scripts" / "worker").read_text()
    copied = " ".join(args for op, args in worker if op == "COPY")
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for version in ("0.41", "0.62"):
        assert f"constraints-openhands-{version}.txt" in copied
        assert f"!constraints-openhands-{version}.txt" in ignored
    entry = json.loads(dict(worker)["ENTRYPOINT"])
    # tests/openhands start workers as `python -m convworker ... --kind openhands`.
    assert entry == ["convworker", "--kind", "openhands"]
    assert ("ARG", "OPENHANDS_VERSION=0.62") in worker


def test_a_plain_build_still_makes_the_server_image() -> None:
    froms = [args for op, args in instructions() if op == "FROM"]
    assert froms[-1] == "python:3.11-slim AS server"
