"""compose.yaml (PostgreSQL and three nodes) checked without a Docker engine: every node's
environment is a valid convsvc configuration for a cluster, and the pieces fit together."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from convsvc.config import Settings
from tests.operators.test_dockerfile import ROOT, stage


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def nodes() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if name.startswith("node")}


def test_three_nodes_and_a_database() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "node1", "node2", "node3"}
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    published = {node["ports"][0].split(":")[0] for node in nodes().values()}
    assert len(published) == 3


@pytest.mark.parametrize("name", ["node1", "node2", "node3"])
def test_each_node_is_a_valid_cluster_configuration(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node = nodes()[name]
    assert node["build"]["target"] == "server" and stage("server")  # a stage of the Dockerfile
    assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    environment = {k: str(v) for k, v in node["environment"].items()}
    for key in list(os.environ):
        if key.startswith("CONVSVC_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    password = tmp_path / "password"
    password.write_text("secret\n")
    monkeypatch.setenv("CONVSVC_DATABASE_PASSWORD_FILE", str(password))
    settings = Settings()
    assert settings.database_url is not None
    url = urlsplit(settings.database_url.get_secret_value())
    assert url.hostname == "postgres" and url.password is None  # the password is a secret
    assert settings.resolved_database_password() == "secret"
    # Other nodes reach it by its service name, on the port it listens on.
    assert settings.advertise_address == f"{name}:{settings.listen.rsplit(':', 1)[1]}"
    assert node["secrets"] == ["db_password"]
    assert environment["CONVSVC_DATABASE_PASSWORD_FILE"] == "/run/secrets/db_password"


def test_the_database_and_the_nodes_share_one_password_secret() -> None:
    spec = compose()
    postgres = spec["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert spec["secrets"]["db_password"]["file"] == "./db-password.txt"
    user = urlsplit(nodes()["node1"]["environment"]["CONVSVC_DATABASE_URL"]).username
    assert user == postgres["POSTGRES_USER"]
