"""The console in a real browser against a real convsvc: conversations started over gRPC
appear without a reload, an echo reply appears live, closing from the page stops the
conversation and leaves an audit entry, a wrong token is refused, a READ token cannot act,
and the pages work against a three-node cluster. No page logs an error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.async_api import expect

from convclient.structs import dict_to_struct
from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.cluster.conftest import Cluster, free_port
from tests.conftest import running_app

TOKEN = "console-test-service-token-7f3a9c"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
async def served(
    tmp_path: Path,
) -> AsyncIterator[tuple[ConvsvcApp, pb_grpc.ConversationServiceStub]]:
    async with running_app(
        tmp_path / "data", auth_token=TOKEN, console_listen="127.0.0.1:0"
    ) as app:
        assert app.server is not None
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            yield app, pb_grpc.ConversationServiceStub(channel)


def url(app: ConvsvcApp) -> str:
    assert app.console_address is not None
    return f"http://{app.console_address}"


async def start(stub: pb_grpc.ConversationServiceStub, cid: str, user: str = "alice") -> None:
    await stub.StartConversation(
        pb.StartConversationRequest(conversation_id=cid, user_id=user), metadata=AUTH
    )


async def say(stub: pb_grpc.ConversationServiceStub, cid: str, text: str) -> None:
    await stub.SendEvent(
        pb.SendEventRequest(
            conversation_id=cid,
            event=dict_to_struct({"action": "message", "args": {"content": text}}),
        ),
        metadata=AUTH,
    )


async def test_conversations_appear_live_and_a_reply_shows_in_the_timeline(
    served: tuple[ConvsvcApp, pb_grpc.ConversationServiceStub], open_console: Callable[..., Any]
) -> None:
    app, stub = served
    console = await open_console(url(app))
    await console.log_in(TOKEN)
    page = console.page
    await expect(page.locator("#count")).to_have_text("0 conversations")

    # Started over gRPC while the page is open: they appear without a reload.
    await start(stub, "live-1")
    await start(stub, "live-2", user="bob")
    await expect(page.locator("#conversation-rows tr")).to_have_count(2)
    await expect(page.locator("#count")).to_have_text("2 conversations")
    row = page.locator('#conversation-rows tr[data-id="live-1"]')
    await expect(row).to_contain_text("alice")
    await expect(row).to_contain_text("echo")
    await expect(row).to_contain_text("RUNNING")
    # The user filter narrows the table.
    await page.fill("#filter-user", "bob")
    await expect(page.locator("#conversation-rows tr")).to_have_count(1)
    await page.fill("#filter-user", "")
    await console.screenshot("conversations")

    # One conversation: its timeline grows live as the echo agent answers.
    await row.locator("a").click()
    await expect(page.locator("#facts")).to_contain_text("RUNNING")
    await say(stub, "live-1", "hello from grpc")
    await expect(page.locator("#timeline")).to_contain_text("hello from grpc")
    replies = page.locator("#timeline .entry", has_text="hello from grpc")
    await expect(replies).to_have_count(2)  # the user's message and the echo
    await console.screenshot("conversation")


async def test_closing_from_the_page_stops_it_and_is_audited(
    served: tuple[ConvsvcApp, pb_grpc.ConversationServiceStub], open_console: Callable[..., Any]
) -> None:
    app, stub = served
    await start(stub, "to-close")
    console = await open_console(url(app))
    await console.log_in(TOKEN)
    page = console.page
    await page.goto(f"{url(app)}/console/#/c/to-close")
    await expect(page.locator("#facts")).to_contain_text("RUNNING")
    await page.click("#action-close")
    await expect(page.locator("#toast")).to_contain_text("Close: done")
    found = await stub.GetConversation(
        pb.GetConversationRequest(conversation_id="to-close"), metadata=AUTH
    )
    assert found.conversation.status == pb.CONVERSATION_STATUS_STOPPED
    audit = await stub.ListAuditEntries(
        pb.ListAuditEntriesRequest(conversation_id="to-close"), metadata=AUTH
    )
    closes = [e for e in audit.entries if e.method == "CloseConversation"]
    assert len(closes) == 1 and closes[0].code == "OK" and closes[0].credential == "service"

    # The audit page shows it.
    await page.goto(f"{url(app)}/console/#/audit")
    await page.fill("#audit-conversation", "to-close")
    await page.click("#audit-search")
    await expect(page.locator("#audit-rows")).to_contain_text("CloseConversation")
    await console.screenshot("audit")

    await page.goto(f"{url(app)}/console/#/workers")
    await expect(page.locator("#worker-rows")).to_contain_text("no worker attached")
    await expect(page.locator("#node-rows")).to_contain_text("not clustered")
    await console.screenshot("workers")

    await page.click("#logout")
    await expect(page.locator("#token")).to_be_visible()
    assert await page.context.cookies() == []
    answer = await page.request.get(f"{url(app)}/console/api/conversations")
    assert answer.status == 401


async def test_a_wrong_token_is_refused(
    served: tuple[ConvsvcApp, pb_grpc.ConversationServiceStub], open_console: Callable[..., Any]
) -> None:
    app, _ = served
    console = await open_console(url(app))
    await console.log_in("not-the-token")
    await expect(console.page.locator("#login-error")).to_have_text("That token was refused.")
    cookies = await console.page.context.cookies()
    assert cookies == []
    # The API refuses without a session, and actions without the CSRF header.
    answer = await console.page.request.get(f"{url(app)}/console/api/conversations")
    assert answer.status == 401
    await console.screenshot("login")


async def test_a_read_token_looks_but_cannot_act(
    served: tuple[ConvsvcApp, pb_grpc.ConversationServiceStub], open_console: Callable[..., Any]
) -> None:
    app, stub = served
    await start(stub, "watched")
    minted = await stub.MintToken(
        pb.MintTokenRequest(user_id="alice", permissions=[pb.PERMISSION_READ]), metadata=AUTH
    )
    console = await open_console(url(app))
    await console.log_in(minted.token)
    page = console.page
    await expect(page.locator('#conversation-rows tr[data-id="watched"]')).to_have_count(1)
    cookie = next(c for c in await page.context.cookies() if c["name"] == "convsvc_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert minted.token not in page.url
    await page.goto(f"{url(app)}/console/#/c/watched")
    await expect(page.locator("#facts")).to_contain_text("RUNNING")
    await page.click("#action-close")
    await expect(page.locator("#toast")).to_contain_text("Close:")
    await expect(page.locator("#toast")).not_to_contain_text("done")
    found = await stub.GetConversation(
        pb.GetConversationRequest(conversation_id="watched"), metadata=AUTH
    )
    assert found.conversation.status == pb.CONVERSATION_STATUS_RUNNING
    # The operator's pages need the service token.
    assert (await page.request.get(f"{url(app)}/console/api/workers")).status == 403
    assert (await page.request.get(f"{url(app)}/console/api/audit")).status == 403
    # A request without the page's CSRF token is refused before convsvc is asked.
    forged = await page.request.post(f"{url(app)}/console/api/conversations/watched/close")
    assert forged.status == 403 and (await forged.json())["reason"] == "CSRF"


async def test_the_console_of_a_three_node_cluster(
    cluster: Callable[..., Cluster], open_console: Callable[..., Any]
) -> None:
    group = cluster(2, CONVSVC_AUTH_TOKEN=TOKEN)
    port = free_port()
    watching = group.start_node(CONVSVC_CONSOLE_LISTEN=f"127.0.0.1:{port}")
    console = await open_console(f"http://127.0.0.1:{port}")
    await console.log_in(TOKEN)
    page = console.page
    await expect(page.locator("#count")).to_have_text("0 conversations")
    # Started on the two other nodes: the console's node shows them, live.
    for index, node in enumerate(group.nodes[:2]):
        await start(node.stub, f"on-node-{index}")
    # Other nodes' changes reach this one through its merged watch (peers found by
    # heartbeat): allow a loaded machine its seconds.
    await expect(page.locator("#conversation-rows tr")).to_have_count(2, timeout=30_000)
    owners = {
        await page.locator(f'#conversation-rows tr[data-id="on-node-{i}"] td').nth(5).inner_text()
        for i in range(2)
    }
    assert owners == {group.nodes[0].address, group.nodes[1].address}
    # One of them, owned elsewhere: its timeline and an echo reply through this node.
    await page.click('#conversation-rows tr[data-id="on-node-0"] a')
    await expect(page.locator("#facts")).to_contain_text("RUNNING")
    await say(watching.stub, "on-node-0", "across the cluster")
    await expect(page.locator("#timeline .entry", has_text="across the cluster")).to_have_count(2)
    # Nodes and their leases.
    await page.goto(f"http://127.0.0.1:{port}/console/#/workers")
    await expect(page.locator("#node-rows tr")).to_have_count(3)
    for node in group.nodes:
        await expect(page.locator("#node-rows")).to_contain_text(node.address)
    await console.screenshot("cluster-nodes")


async def test_approving_from_the_page_and_older_events_on_scroll(
    served: tuple[ConvsvcApp, pb_grpc.ConversationServiceStub], open_console: Callable[..., Any]
) -> None:
    app, stub = served
    await stub.StartConversation(
        pb.StartConversationRequest(
            conversation_id="asks", settings=dict_to_struct({"confirmation_mode": True})
        ),
        metadata=AUTH,
    )
    await say(stub, "asks", "ls -la")
    console = await open_console(url(app))
    await console.log_in(TOKEN)
    page = console.page
    await page.goto(f"{url(app)}/console/#/c/asks")
    await expect(page.locator("#pending")).to_contain_text("Waiting for approval: run")
    await expect(page.locator("#pending")).to_contain_text("ls -la")
    await console.screenshot("approval")
    await page.click("#action-approve")
    await expect(page.locator("#pending")).to_be_hidden()
    await expect(page.locator("#timeline")).to_contain_text("agent state: user_confirmed")
    audit = await stub.ListAuditEntries(
        pb.ListAuditEntriesRequest(conversation_id="asks"), metadata=AUTH
    )
    assert [e.method for e in audit.entries if e.method == "ConfirmAction"] == ["ConfirmAction"]

    # A long log: the newest events first, older ones as the timeline scrolls up.
    await start(stub, "long")
    for n in range(40):
        await say(stub, "long", f"message number {n}")
    await page.goto(f"{url(app)}/console/#/c/long")
    await expect(page.locator("#timeline")).to_contain_text("message number 39")
    await expect(page.locator('#timeline .entry[data-event-id="0"]')).to_have_count(0)
    entries = page.locator("#timeline .entry")
    while not await page.locator('#timeline .entry[data-event-id="0"]').count():
        shown = await entries.count()
        await page.locator("#timeline").evaluate(
            "(t) => { t.scrollTop = 0; t.dispatchEvent(new Event('scroll')); }"
        )
        await expect(entries).not_to_have_count(shown)  # a page of older events arrived
    ids = [
        int(i)
        for i in await page.locator("#timeline .entry").evaluate_all(
            "(entries) => entries.map((e) => e.dataset.eventId)"
        )
    ]
    assert ids == list(range(len(ids)))  # every event once, in order


async def test_another_site_cannot_log_in_or_act(
    served: tuple[ConvsvcApp, pb_grpc.ConversationServiceStub], open_console: Callable[..., Any]
) -> None:
    app, stub = served
    await start(stub, "guarded")
    console = await open_console(url(app))
    await console.log_in(TOKEN)
    session = await console.page.request.get(f"{url(app)}/console/api/session")
    csrf = (await session.json())["csrf"]
    forged = {"Origin": "http://evil.example", "X-CSRF-Token": csrf}
    acted = await console.page.request.post(
        f"{url(app)}/console/api/conversations/guarded/close", headers=forged
    )
    assert acted.status == 403
    logged = await console.page.request.post(
        f"{url(app)}/console/login",
        form={"token": TOKEN},
        headers={"Origin": "http://evil.example"},
    )
    assert logged.status == 403
    found = await stub.GetConversation(
        pb.GetConversationRequest(conversation_id="guarded"), metadata=AUTH
    )
    assert found.conversation.status == pb.CONVERSATION_STATUS_RUNNING
