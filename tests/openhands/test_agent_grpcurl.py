"""The README's grpcurl lines for a real OpenHands conversation, run as written (with the
test's address and fake LLM) with the real grpcurl binary: start it, then watch it work."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.openhands.conftest import LLM_KEY, AgentWorker, Convsvc
from tests.openhands.fake_llm import FakeLLM

README = Path(__file__).parents[2] / "README.md"
SECTION = "### Run an OpenHands conversation with grpcurl"


def readme_commands() -> list[str]:
    section = README.read_text().split(SECTION, 1)[1].split("\n#", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("grpcurl ")]


def messages(buffer: str) -> tuple[list[dict[str, Any]], str]:
    """The complete JSON messages at the start of grpcurl's output, and the rest."""
    decoder = json.JSONDecoder()
    found = []
    buffer = buffer.lstrip()
    while buffer:
        try:
            message, end = decoder.raw_decode(buffer)
        except json.JSONDecodeError:
            break
        found.append(message)
        buffer = buffer[end:].lstrip()
    return found, buffer


async def test_the_readme_s_grpcurl_lines_start_and_watch_an_openhands_conversation(
    agent_convsvc: Convsvc, agent_workers: list[AgentWorker], fake_llm: FakeLLM
) -> None:
    start, watch = (c.replace("127.0.0.1:50051", agent_convsvc.address) for c in readme_commands())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LLM_BASE_URL": fake_llm.base_url,
        "LLM_API_KEY": LLM_KEY,
    }
    started = await asyncio.create_subprocess_exec(
        "bash", "-c", start, env=env, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await asyncio.wait_for(started.communicate(), 30)
    assert started.returncode == 0
    conversation = json.loads(output)["conversation"]
    assert conversation["conversation_id"] == "oh-demo"
    assert conversation["agent"] == "openhands"

    watching = await asyncio.create_subprocess_exec(
        "bash", "-c", watch, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert watching.stdout is not None
    events: list[dict[str, Any]] = []
    buffer = ""
    try:
        async with asyncio.timeout(60):
            while not any(e.get("payload", {}).get("action") == "finish" for e in events):
                chunk = await watching.stdout.read(65536)
                assert chunk, "grpcurl's stream ended before the agent finished"
                found, buffer = messages(buffer + chunk.decode())
                for message in found:
                    events.extend(message.get("events", []))
    finally:
        watching.kill()
        await watching.wait()
    names = [e["name"] for e in events]
    assert "run" in names and "finish" in names
    # JSON leaves out default values: event 0 has no "id".
    assert [int(e.get("id", 0)) for e in events] == list(range(len(events)))
