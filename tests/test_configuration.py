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


def test_the_console_without_auth_stays_on_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert main(["serve", *data, "--console-listen", "0.0.0.0:8080"]) == 2
    assert "the console without a service token serves only on loopback" in capsys.readouterr().err
    # On loopback, behind a token, or when the operator says so, it starts.
    assert build_settings(["serve", *data, "--console-listen", "127.0.0.1:8080"]).console_listen
    assert build_settings(
        ["serve", *data, "--console-listen", "0.0.0.0:8080", "--auth-token-file", _token(tmp_path)]
    ).console_listen
    monkeypatch.setenv("CONVSVC_CONSOLE_ALLOW_REMOTE_WITHOUT_AUTH", "true")
    allowed = build_settings(["serve", *data, "--console-listen", "0.0.0.0:8080"])
    assert allowed.console_listen == "0.0.0.0:8080"


def _token(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("a-service-token-for-the-console")
    return str(path)
