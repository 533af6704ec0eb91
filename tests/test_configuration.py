"""Configuration comes from CONVSVC_* variables; flags override them; bad values stop start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from convsvc.cli import build_settings, main


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVSVC_LISTEN", "127.0.0.1:6000")
    monkeypatch.setenv("CONVSVC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVSVC_ENGINE__MAX_CONCURRENT_CONVERSATIONS", "7")
    settings = build_settings(["serve"])
    assert settings.listen == "127.0.0.1:6000"
    assert settings.data_dir == tmp_path
    assert settings.engine.max_concurrent_conversations == 7


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVSVC_LISTEN", "127.0.0.1:6000")
    settings = build_settings(["serve", "--listen", "127.0.0.1:7000", "--data-dir", str(tmp_path)])
    assert settings.listen == "127.0.0.1:7000"
    assert settings.data_dir == tmp_path


def test_token_file_is_read(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    settings = build_settings(["serve", "--auth-token-file", str(token)])
    assert settings.resolved_auth_token() == "s3cret"


def test_half_a_tls_pair_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--tls-cert-file", str(tmp_path / "cert.pem")]) == 2
    assert "CONVSVC_TLS_KEY_FILE" in capsys.readouterr().err


def test_empty_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("")
    assert main(["serve", "--auth-token-file", str(token)]) == 2
    assert "empty" in capsys.readouterr().err
