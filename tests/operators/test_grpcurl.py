"""The README's grpcurl walkthrough, run with the real grpcurl binary against `convsvc serve`.

The commands are read from the README, so the documentation and this test cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.helpers import agent_state_is, grpc_events_until

README = Path(__file__).parents[2] / "README.md"
GRPCURL = Path(sys.executable).parent / "grpcurl"
COMMAND_TIMEOUT = 30.0


def walkthrough_commands() -> dict[str, list[str]]:
    """The grpcurl lines of the README's grpcurl section, keyed by the method they call."""
    text = README.read_text()
    section = text.split("## Try it with grpcurl", 1)[1].split("\n## ", 1)[0]
    commands: dict[str, list[str]] = {}
    in_code = False
    for line in section.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        line = line.removeprefix("$ ")
        if in_code and line.startswith("grpcurl "):
            argv = shlex.split(line)
            key = argv[-1] if "/" in argv[-1] else "list"
            commands.setdefault(key, argv)
    return commands


def expand(argv: list[str], address: str) -> list[str]:
    return [str(GRPCURL), *(address if arg == "$ADDR" else arg for arg in argv[1:])]


async def grpcurl(argv: list[str], address: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *expand(argv, address),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def grpcurl_json(argv: list[str], address: str) -> dict[str, Any]:
    code, output = await grpcurl(argv, address)
    assert code == 0, output
    parsed: dict[str, Any] = json.loads(output)
    return parsed


class StreamReader:
    """Parses the JSON messages grpcurl prints for a server stream, as they arrive."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self.events: list[dict[str, Any]] = []

    async def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> None:
        async def read() -> None:
            assert self._process.stdout is not None
            while not done(self.events):
                chunk = await self._process.stdout.read(65536)
                if not chunk:
                    raise AssertionError(f"grpcurl's stream ended early: {self._buffer}")
                self._buffer += chunk.decode()
                self._parse()

        await asyncio.wait_for(read(), COMMAND_TIMEOUT)

    def _parse(self) -> None:
        while True:
            text = self._buffer.lstrip()
            if not text:
                return
            try:
                message, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                return  # the rest of this message has not arrived yet
            self._buffer = text[end:]
            self.events.extend(event["payload"] for event in message.get("events", []))


def has_agent_state(state: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(
        e.get("observation") == "agent_state_changed" and e["extras"]["agent_state"] == state
        for e in events
    )


def has_echo(content: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(
        e.get("source") == "agent" and e.get("action") == "message" and e["message"] == content
        for e in events
    )


@pytest.fixture
def address(server_process: Callable[..., Any]) -> str:
    server = server_process()
    started: str = server.start()
    return started


async def test_readme_walkthrough(address: str) -> None:
    commands = walkthrough_commands()
    service = "convsvc.v1.ConversationService"

    code, listing = await grpcurl(commands["list"], address)
    assert code == 0, listing
    assert set(listing.split()) >= {
        service,
        "grpc.health.v1.Health",
        "convsvc.v1.AgentWorkerService",
    }

    # Every service listed can be described (the real grpcurl asks reflection v1 first).
    for listed in listing.split():
        code, described = await grpcurl(
            ["grpcurl", "-plaintext", "$ADDR", "describe", listed], address
        )
        assert code == 0 and f"{listed} is a service" in described, described

    health = await grpcurl_json(commands["grpc.health.v1.Health/Check"], address)
    assert health == {"status": "SERVING"}

    started = await grpcurl_json(commands[f"{service}/StartConversation"], address)
    assert started["conversation"]["conversation_id"] == "demo"
    assert started["conversation"]["user_id"] == "alice"

    joined = await grpcurl_json(commands[f"{service}/JoinConversation"], address)
    assert joined["connection"]["connection_id"] == "browser-1"

    stream = await asyncio.create_subprocess_exec(
        *expand(commands[f"{service}/StreamEvents"], address),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        reader = StreamReader(stream)
        await reader.until(has_agent_state("awaiting_user_input"))

        sent = await grpcurl_json(commands[f"{service}/SendEvent"], address)
        assert sent["conversation_id"] == "demo"
        await reader.until(has_echo("hi"))
        ids = [event["id"] for event in reader.events]
        assert ids == list(range(len(ids)))
        assert int(sent["event_id"]) in ids  # int64 is a JSON string in proto3 JSON

        conversations = await grpcurl_json(commands[f"{service}/ListConversations"], address)
        [conversation] = conversations["conversations"]
        assert conversation["conversation_id"] == "demo"
        assert conversation["status"] == "CONVERSATION_STATUS_RUNNING"

        connections = await grpcurl_json(commands[f"{service}/ListConnections"], address)
        assert [c["connection_id"] for c in connections["connections"]] == ["browser-1"]

        disconnected = await grpcurl_json(commands[f"{service}/DisconnectConnection"], address)
        assert disconnected == {"removed": True}

        closed = await grpcurl_json(commands[f"{service}/CloseConversation"], address)
        assert closed["conversation"]["status"] == "CONVERSATION_STATUS_STOPPED"
        await reader.until(has_agent_state("stopped"))
    finally:
        stream.kill()
        await stream.wait()

    after = await grpcurl_json(commands[f"{service}/ListConversations"], address)
    assert after.get("conversations", []) == []


async def test_readme_error_example(address: str) -> None:
    code, output = await grpcurl(
        walkthrough_commands()["convsvc.v1.ConversationService/GetConversation"], address
    )
    assert code != 0
    documented = README.read_text().split("$ grpcurl", 1)[1].split("```", 1)[0]
    for expected in ("Code: NotFound", "Message: conversation nope does not exist"):
        assert expected in documented
        assert expected in output
    assert '"reason":"CONVERSATION_NOT_FOUND"' in output


@pytest.mark.parametrize(
    ("method", "request_json", "code", "reason"),
    [
        ("GetConversation", {"conversation_id": "bad id"}, "InvalidArgument", "INVALID_ID"),
        (
            "SendEvent",
            {"conversation_id": "demo", "event": {"args": {"content": "hi"}}},
            "InvalidArgument",
            "INVALID_EVENT",
        ),
        ("ListConversations", {"page_size": -1}, "InvalidArgument", "INVALID_PAGE_SIZE"),
        ("DisconnectConnection", {}, "InvalidArgument", "INVALID_ID"),
    ],
)
async def test_bad_requests_show_code_and_reason(
    address: str, method: str, request_json: dict[str, Any], code: str, reason: str
) -> None:
    argv = ["grpcurl", "-plaintext", "-d", json.dumps(request_json), "$ADDR"]
    exit_code, output = await grpcurl([*argv, f"convsvc.v1.ConversationService/{method}"], address)
    assert exit_code != 0
    assert f"Code: {code}" in output
    assert re.search(rf'"reason":\s*"{reason}"', output), output
    assert "Traceback" not in output


def section_blocks(title: str) -> list[str]:
    """The code blocks of a README section."""
    text = README.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return text.split("```sh\n")[1:]


def live_view_commands() -> tuple[list[str], list[str], bytes]:
    """The README's WatchConversations command, and its Connect command with its stdin."""
    watch_block, connect_block = section_blocks("Live views: WatchConversations and Connect")
    watch = shlex.split(watch_block.split("```", 1)[0].strip())
    first, *rest = connect_block.split("```", 1)[0].strip().splitlines()
    connect = shlex.split(first.split("<<", 1)[0])
    stdin = "\n".join(line for line in rest if line != "EOF") + "\n"
    return watch, connect, stdin.encode()


def json_messages(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl printed, one after another."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    text = text.lstrip()
    while text:
        message, end = decoder.raw_decode(text)
        found.append(message)
        text = text[end:].lstrip()
    return found


class MessageReader(StreamReader):
    """Keeps grpcurl's printed messages whole (not only their events)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        super().__init__(process)
        self.messages: list[dict[str, Any]] = []

    def _parse(self) -> None:
        while True:
            text = self._buffer.lstrip()
            try:
                message, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                return
            self._buffer = text[end:]
            self.messages.append(message)
            self.events.append(message)


async def test_readme_live_views_watch_and_connect(address: str) -> None:
    watch_argv, connect_argv, connect_stdin = live_view_commands()
    start = walkthrough_commands()["convsvc.v1.ConversationService/StartConversation"]
    watch = await asyncio.create_subprocess_exec(
        *expand(watch_argv, address), stdout=asyncio.subprocess.PIPE
    )
    try:
        reader = MessageReader(watch)
        await reader.until(lambda messages: any(m.get("snapshot_complete") for m in messages))
        await grpcurl_json(start, address)  # "demo" for alice

        def changed(kind: str) -> Callable[[list[dict[str, Any]]], bool]:
            return lambda messages: any(
                change["kind"] == f"CONVERSATION_CHANGE_KIND_{kind}"
                and change["watched"]["conversation"]["conversation_id"] == "demo"
                for m in messages
                for change in m.get("changes", [])
            )

        await reader.until(changed("CREATED"))
        assert all(m.get("resume_token") for m in reader.messages)

        connect = await asyncio.create_subprocess_exec(
            *expand(connect_argv, address),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(connect.communicate(connect_stdin), COMMAND_TIMEOUT)
        assert connect.returncode == 0, output.decode()
        opened, *rest = json_messages(output.decode())
        assert opened["opened"]["connection"]["connection_id"] == "browser-2"
        [result] = [m["send_result"] for m in rest if "send_result" in m]
        assert result["request_id"] == "hi-again-1" and "failure" not in result
        delivered = [
            event["payload"]
            for m in rest
            if "events" in m
            for event in m["events"].get("events", [])
        ]
        mine = next(p for p in delivered if p["id"] == int(result["event_id"]))
        assert mine["message"] == "hi again"  # what the send appended came before the end

        # The watch saw the Connect connection come and go.
        await reader.until(
            lambda messages: (
                [
                    len(change["watched"].get("connection_ids", []))
                    for m in messages
                    for change in m.get("changes", [])
                    if change["kind"] == "CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED"
                ][-2:]
                == [1, 0]
            )
        )
    finally:
        watch.kill()
        await watch.wait()


async def test_readme_admission_policy_example(address: str) -> None:
    [reject_block] = section_blocks("Admission policies")
    reject = shlex.split(reject_block.split("```", 1)[0].strip())
    service = "convsvc.v1.ConversationService"
    for cid in ("a", "b", "c"):  # the limit is 3
        start = [
            "grpcurl",
            "-plaintext",
            "-d",
            json.dumps({"conversation_id": cid, "user_id": "alice"}),
            "$ADDR",
            f"{service}/StartConversation",
        ]
        await grpcurl_json(start, address)
    code, output = await grpcurl(reject, address)
    assert code != 0
    assert "Code: ResourceExhausted" in output
    assert re.search(r'"reason":\s*"TOO_MANY_CONVERSATIONS"', output), output
    assert '"running_conversation_ids":"a,b,c"' in output.replace(" ", "")


def token_commands() -> dict[str, list[str]]:
    [block] = section_blocks("Scoped tokens and the audit log")
    commands = {}
    for line in block.split("```", 1)[0].strip().splitlines():
        if line.startswith("grpcurl "):
            argv = shlex.split(line)
            commands[argv[-1].rsplit("/", 1)[1]] = argv
    return commands


async def test_readme_scoped_token_walkthrough(server_process: Callable[..., Any]) -> None:
    service_token = "the-service-token"
    [block] = section_blocks("Scoped tokens and the audit log")
    assert f"TOKEN={service_token}" in block
    address = server_process({"CONVSVC_AUTH_TOKEN": service_token}).start()
    commands = token_commands()
    values = {"$ADDR": address, "$TOKEN": service_token}

    def filled(argv: list[str]) -> list[str]:
        out = []
        for arg in argv[1:]:
            for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
                arg = arg.replace(name, value)
            out.append(arg)
        return [str(GRPCURL), *out]

    async def run(argv: list[str]) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *filled(argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        return process.returncode or 0, output.decode()

    start = walkthrough_commands()["convsvc.v1.ConversationService/StartConversation"]
    code, output = await run(["grpcurl", "-H", "authorization: Bearer $TOKEN", *start[1:]])
    assert code == 0, output
    code, output = await run(commands["MintToken"])
    assert code == 0, output
    minted = json.loads(output)
    values["$SCOPED"], values["$TOKEN_ID"] = minted["token"], minted["token_id"]

    code, output = await run(commands["GetConversation"])
    assert code == 0, output
    assert json.loads(output)["conversation"]["user_id"] == "alice"
    code, output = await run(commands["RevokeToken"])
    assert code == 0, output
    code, output = await run(commands["GetConversation"])
    assert code != 0 and "Code: Unauthenticated" in output
    assert re.search(r'"reason":\s*"TOKEN_REVOKED"', output), output

    code, output = await run(commands["ListAuditEntries"])
    assert code == 0, output
    entries = json.loads(output)["entries"]
    assert [(e["method"], e["credential"]) for e in entries] == [
        ("StartConversation", "service")
    ]  # GetConversation reads are not mutations; the mint names no conversation


async def test_readme_run_control_example(address: str) -> None:
    """The README's ControlAgent command pauses a thinking echo agent, and a second run of it
    writes nothing (the agent is paused already)."""
    [block] = [b for b in section_blocks("Run control") if "ControlAgent" in b]
    pause = shlex.split(block.split("```", 1)[0].strip())
    service = "convsvc.v1.ConversationService"
    start = {"conversation_id": "demo-1", "settings": {"echo_reply_delay_seconds": 600}}
    send = {"conversation_id": "demo-1", "event": {"action": "message", "args": {"content": "hi"}}}
    for method, body in (("StartConversation", start), ("SendEvent", send)):
        await grpcurl_json(
            ["grpcurl", "-plaintext", "-d", json.dumps(body), "$ADDR", f"{service}/{method}"],
            address,
        )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await grpc_events_until(stub, "demo-1", agent_state_is("running"))
    paused = await grpcurl_json(pause, address)
    assert paused["agent_state"] == "paused" and "event_id" in paused, paused
    again = await grpcurl_json(pause, address)
    assert again == {"conversation_id": "demo-1", "agent_state": "paused"}


async def test_readme_approvals_example(address: str) -> None:
    """The README's approval commands: a start in confirmation mode, the list of those
    waiting (which shows the pending action as documented), and its approval."""
    [block] = section_blocks("Approvals")
    start, listing, confirm = (
        shlex.split(line) for line in block.split("```", 1)[0].strip().splitlines()
    )
    await grpcurl_json(start, address)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await grpc_events_until(  # the action awaiting confirmation (logged after the state)
            stub,
            "demo-2",
            lambda events: any(
                e.get("args", {}).get("confirmation_state") == "awaiting_confirmation"
                for e in events
            ),
        )
    listed = await grpcurl_json(listing, address)
    [waiting] = listed["conversations"]
    assert waiting["pending_action"] == {
        "event_id": "5",
        "action": "run",
        "content": "make deploy",
        "security_risk": "SECURITY_RISK_LOW",
    }
    assert (await grpcurl_json(confirm, address))["agent_state"] == "user_confirmed"
    code, refused = await grpcurl(confirm, address)  # decided already: the id is stale
    assert code != 0 and "ACTION_NOT_PENDING" in refused


async def test_readme_find_conversations_example(address: str) -> None:
    """The README's labels, search and update commands, as documented."""
    [block] = section_blocks("Find conversations")
    start, search, update = (
        shlex.split(line) for line in block.split("```", 1)[0].strip().splitlines()
    )
    started = await grpcurl_json(start, address)
    assert started["conversation"]["labels"] == {"team": "red", "ticket": "T-42"}
    found = await grpcurl_json(search, address)
    assert [c["conversation_id"] for c in found["conversations"]] == ["demo-3"]
    updated = await grpcurl_json(update, address)
    assert updated["conversation"]["title"] == "Release notes 1.2"
    assert updated["conversation"]["labels"]["team"] == "red"  # not in the mask: kept


async def test_readme_fork_example(address: str) -> None:
    """The README's ForkConversation command forks demo-1 after its third event."""
    [block] = section_blocks("Fork")
    fork = shlex.split(block.split("```", 1)[0].strip())
    service = "convsvc.v1.ConversationService"
    start = {
        "conversation_id": "demo-1",
        "initial_user_message": {"action": "message", "args": {"content": "hi"}},
    }
    await grpcurl_json(
        ["grpcurl", "-plaintext", "-d", json.dumps(start), "$ADDR", f"{service}/StartConversation"],
        address,
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        source = await grpc_events_until(stub, "demo-1", has_echo("hi"))
        forked = await grpcurl_json(fork, address)
        assert forked["conversation"]["conversation_id"] == "demo-1-retry"
        copied = await grpc_events_until(stub, "demo-1-retry", lambda events: len(events) > 3)
    assert copied[:3] == source[:3]


async def test_readme_webhook_example(server_process: Callable[..., Any]) -> None:
    """The README's webhook commands, on a server that allows loopback endpoints: the
    endpoint is down, so the closed conversation's delivery waits, listed as PENDING."""
    [block] = section_blocks("Webhooks")
    create, pending = (shlex.split(line) for line in block.split("```", 1)[0].strip().splitlines())
    server = server_process(
        {
            "CONVSVC_WEBHOOKS__ALLOW_PRIVATE_TARGETS": "true",
            "CONVSVC_WEBHOOKS__POLL_INTERVAL_SECONDS": "0.05",
        }
    )
    address = server.start()
    created = await grpcurl_json(create, address)
    assert created["webhook"]["secret"].startswith("whsec_")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        await stub.StartConversation(pb.StartConversationRequest(conversation_id="demo-4"))
        await stub.CloseConversation(pb.CloseConversationRequest(conversation_id="demo-4"))
    listed = await grpcurl_json(pending, address)
    [delivery] = listed["deliveries"]
    assert (delivery["conversation_id"], delivery["type"]) == (
        "demo-4",
        "WEBHOOK_EVENT_TYPE_CLOSED",
    )


async def test_readme_list_workers_example(
    server_process: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    """The README's ListWorkers command shows an attached worker and what it runs."""
    [block] = [b for b in section_blocks("Operator console") if "ListWorkers" in b]
    command = shlex.split(block.split("```", 1)[0].strip())
    token = "grpcurl-list-workers-token"
    server = server_process(
        {"CONVSVC_AUTH_TOKEN": token, "CONVSVC_WORKERS__KINDS": '["worker-echo"]'}
    )
    address = server.start()
    worker = start_worker(address, "console-worker", CONVSVC_TOKEN=token)
    argv = [arg.replace("$CONVSVC_AUTH_TOKEN", token) for arg in command]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ConversationServiceStub(channel)
        auth = (("authorization", f"Bearer {token}"),)
        # The start waits for a worker; the worker's first event says it runs there.
        await stub.StartConversation(
            pb.StartConversationRequest(conversation_id="on-a-worker", agent="worker-echo"),
            metadata=auth,
        )
        await grpc_events_until(
            stub,
            "on-a-worker",
            agent_state_is("awaiting_user_input"),
            timeout=60,
            metadata=auth,
        )
        listed = await grpcurl_json(argv, address)
    [shown] = listed["workers"]
    assert shown["worker_id"] == worker.worker_id
    assert shown["kinds"] == ["worker-echo"] and shown["capacity"] == 4
    assert shown["load"] == 1 and shown["conversation_ids"] == ["on-a-worker"]
    assert "nodes" not in listed  # not clustered
    code, refused = await grpcurl(
        [a for a in argv if not a.startswith("authorization") and a != "-H"], address
    )
    assert code != 0 and "Unauthenticated" in refused
