"""TLS and mutual TLS, with certificates made for the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from convsvc.app import ConvsvcApp
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc
from tests.certs import CertificateAuthority
from tests.conftest import running_app

CALL_TIMEOUT = 10.0


@pytest.fixture
def server_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path, "server")


@pytest.fixture
def client_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path, "clients")


async def list_over(channel: grpc.aio.Channel) -> pb.ListConversationsResponse:
    stub = pb_grpc.ConversationServiceStub(channel)
    response: pb.ListConversationsResponse = await stub.ListConversations(
        pb.ListConversationsRequest(), timeout=CALL_TIMEOUT
    )
    return response


@pytest.fixture
async def tls_app(tmp_path: Path, server_ca: CertificateAuthority) -> AsyncIterator[ConvsvcApp]:
    issued = server_ca.issue_server()
    async with running_app(
        tmp_path / "data", tls_cert_file=issued.cert_file, tls_key_file=issued.key_file
    ) as app:
        yield app


@pytest.fixture
async def mtls_app(
    tmp_path: Path, server_ca: CertificateAuthority, client_ca: CertificateAuthority
) -> AsyncIterator[ConvsvcApp]:
    issued = server_ca.issue_server()
    async with running_app(
        tmp_path / "data",
        tls_cert_file=issued.cert_file,
        tls_key_file=issued.key_file,
        tls_client_ca_file=client_ca.cert_file,
    ) as app:
        yield app


def address(app: ConvsvcApp) -> str:
    assert app.server is not None
    return app.server.address


async def test_a_client_trusting_the_ca_gets_answers(
    tls_app: ConvsvcApp, server_ca: CertificateAuthority
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=server_ca.cert())
    async with grpc.aio.secure_channel(address(tls_app), credentials) as channel:
        response = await list_over(channel)
    assert list(response.conversations) == []


async def test_a_plaintext_client_is_refused(tls_app: ConvsvcApp) -> None:
    async with grpc.aio.insecure_channel(address(tls_app)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_over(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_not_trusting_the_ca_is_refused(tls_app: ConvsvcApp, tmp_path: Path) -> None:
    stranger = CertificateAuthority(tmp_path, "stranger")
    credentials = grpc.ssl_channel_credentials(root_certificates=stranger.cert())
    async with grpc.aio.secure_channel(address(tls_app), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_over(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_app: ConvsvcApp, server_ca: CertificateAuthority
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=server_ca.cert())
    async with grpc.aio.secure_channel(address(mtls_app), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_over(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_certificate_from_another_ca(
    mtls_app: ConvsvcApp, server_ca: CertificateAuthority, tmp_path: Path
) -> None:
    impostor = CertificateAuthority(tmp_path, "impostor").issue_client()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server_ca.cert(),
        private_key=impostor.key(),
        certificate_chain=impostor.cert(),
    )
    async with grpc.aio.secure_channel(address(mtls_app), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_over(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_admits_a_client_signed_by_the_client_ca(
    mtls_app: ConvsvcApp, server_ca: CertificateAuthority, client_ca: CertificateAuthority
) -> None:
    client = client_ca.issue_client()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server_ca.cert(),
        private_key=client.key(),
        certificate_chain=client.cert(),
    )
    async with grpc.aio.secure_channel(address(mtls_app), credentials) as channel:
        response = await list_over(channel)
    assert list(response.conversations) == []
