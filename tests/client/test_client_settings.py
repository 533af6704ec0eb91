"""Address, token and TLS from the environment (as an OpenHands operator sets them) or from
arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from convclient import AsyncConvsvcClient, ClientSettings, UnauthenticatedError
from tests.certs import CertificateAuthority
from tests.conftest import running_app

TOKEN = "client-test-token"


async def test_address_and_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(tmp_path / "data", auth_token=TOKEN) as app:
        assert app.server is not None
        monkeypatch.setenv("CONVSVC_ADDRESS", app.server.address)
        monkeypatch.setenv("CONVSVC_TOKEN", TOKEN)
        async with AsyncConvsvcClient() as client:
            assert (await client.list_conversations()).items == []
        async with AsyncConvsvcClient(token="wrong") as client:  # arguments win
            with pytest.raises(UnauthenticatedError) as caught:
                await client.list_conversations()
        assert caught.value.reason == "UNAUTHENTICATED"


async def test_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("CONVSVC_TOKEN_FILE", str(token_file))
    async with running_app(tmp_path / "data", auth_token=TOKEN) as app:
        assert app.server is not None
        async with AsyncConvsvcClient(address=app.server.address) as client:
            assert (await client.list_conversations()).items == []


async def test_mutual_tls_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_ca = CertificateAuthority(tmp_path, "server")
    client_ca = CertificateAuthority(tmp_path, "clients")
    server_cert = server_ca.issue_server()
    client_cert = client_ca.issue_client()
    async with running_app(
        tmp_path / "data",
        tls_cert_file=server_cert.cert_file,
        tls_key_file=server_cert.key_file,
        tls_client_ca_file=client_ca.cert_file,
    ) as app:
        assert app.server is not None
        monkeypatch.setenv("CONVSVC_ADDRESS", app.server.address)
        monkeypatch.setenv("CONVSVC_TLS_CA_FILE", str(server_ca.cert_file))
        monkeypatch.setenv("CONVSVC_CLIENT_CERT_FILE", str(client_cert.cert_file))
        monkeypatch.setenv("CONVSVC_CLIENT_KEY_FILE", str(client_cert.key_file))
        async with AsyncConvsvcClient() as client:
            assert (await client.list_conversations()).items == []


def test_server_variables_do_not_leak_into_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # A shared environment: the server's own certificate must not become the client's.
    monkeypatch.setenv("CONVSVC_TLS_CERT_FILE", "/server/cert.pem")
    monkeypatch.setenv("CONVSVC_AUTH_TOKEN", "server-side")
    settings = ClientSettings()
    assert settings.client_cert_file is None
    assert settings.resolved_token() is None
    assert not settings.uses_tls


def test_half_a_client_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="go together"):
        ClientSettings(client_cert_file=Path("cert.pem"))
