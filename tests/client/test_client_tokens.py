"""The clients' scoped tokens and audit log against a real server with a service token."""

from __future__ import annotations

import asyncio

import pytest

from convclient import (
    AsyncConvsvcClient,
    ConvsvcClient,
    Permission,
    PermissionDeniedError,
    UnauthenticatedError,
)
from tests.conftest import running_app

SERVICE_TOKEN = "client-tests-service-token"
HI = {"action": "message", "args": {"content": "hi"}}


async def test_a_scoped_token_from_the_client_and_the_audit_of_its_use(tmp_path) -> None:
    async with running_app(tmp_path / "data", auth_token=SERVICE_TOKEN) as app:
        assert app.server is not None
        address = app.server.address
        async with AsyncConvsvcClient(address=address, token=SERVICE_TOKEN) as service:
            await service.start_conversation("c1", user_id="alice")
            scoped = await service.mint_token(
                "alice", [Permission.READ, "write"], conversation_ids=["c1"], ttl_seconds=600
            )
            async with AsyncConvsvcClient(address=address, token=scoped.token) as browser:
                sent = await browser.send_event(HI, conversation_id="c1")
                with pytest.raises(PermissionDeniedError) as denied:
                    await browser.close_conversation("c1")
                assert denied.value.reason == "TOKEN_SCOPE"
                await service.revoke_token(scoped.token_id)
                with pytest.raises(UnauthenticatedError) as revoked:
                    await browser.get_conversation("c1")
                assert revoked.value.reason == "TOKEN_REVOKED"
            page = await service.list_audit_entries(conversation_id="c1")
            assert [(e.method, e.code) for e in page.items] == [
                ("StartConversation", "OK"),
                ("SendEvent", "OK"),
                ("CloseConversation", "PERMISSION_DENIED"),
            ]
            assert page.items[1].token_id == scoped.token_id
            assert page.items[1].conversation_id == "c1" and sent.event_id >= 0

        def blocking() -> list[str]:
            with ConvsvcClient(address=address, token=SERVICE_TOKEN) as client:
                return [e.method for e in client.list_audit_entries(user_id="alice").items]

        methods = await asyncio.to_thread(blocking)
        assert methods == ["StartConversation", "MintToken", "SendEvent", "CloseConversation"]
