"""The ``convsvc`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from convsvc.config import Settings
from convsvc.storage import StorageError

SERVER_EXTRA = (
    "the server's dependencies come with the 'server' extra: pip install 'convsvc[server]' "
    "(from a checkout: pip install -c constraints.txt '.[server]'). The client alone "
    "(convclient) needs none of them."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convsvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description="Run the service. Every flag also reads from CONVSVC_<NAME> (flags win).",
    )
    serve.add_argument("--listen", help="host:port to listen on (CONVSVC_LISTEN)")
    serve.add_argument("--data-dir", type=Path, help="where the event log lives (CONVSVC_DATA_DIR)")
    serve.add_argument(
        "--ready-file", type=Path, help="write the bound host:port here once serving"
    )
    serve.add_argument("--auth-token-file", type=Path, help="require this bearer token")
    serve.add_argument("--tls-cert-file", type=Path)
    serve.add_argument("--tls-key-file", type=Path)
    serve.add_argument("--tls-client-ca-file", type=Path, help="require client certificates (mTLS)")
    serve.add_argument("--metrics-listen", help="host:port for Prometheus /metrics")
    serve.add_argument(
        "--console-listen", help="host:port for the operator console (CONVSVC_CONSOLE_LISTEN)"
    )
    serve.add_argument(
        "--agent-server-listen",
        help="host:port for the OpenHands agent-server API (CONVSVC_AGENT_SERVER_LISTEN)",
    )
    serve.add_argument(
        "--database-url",
        help="postgresql://user@host:port/db: run as a node of a cluster (CONVSVC_DATABASE_URL)",
    )
    serve.add_argument(
        "--database-password-file", type=Path, help="read the database password from this file"
    )
    serve.add_argument(
        "--advertise-address", help="host:port other nodes reach this one at (default: bound)"
    )
    serve.add_argument("--log-level")
    serve.add_argument("--log-format", choices=["json", "console"])
    migrate = commands.add_parser(
        "migrate",
        help="create or update the PostgreSQL schema (serve also does it on start)",
        description="Apply the schema migrations a PostgreSQL database lacks.",
    )
    migrate.add_argument("--database-url", help="postgresql://... (CONVSVC_DATABASE_URL)")
    migrate.add_argument("--database-password-file", type=Path)
    health = commands.add_parser(
        "health",
        help="check that a running server is SERVING (exit status 0) or not (1)",
        description="Ask a server's gRPC health service about convsvc.v1.ConversationService.",
    )
    health.add_argument(
        "--address", help="host:port of the server (default: derived from CONVSVC_LISTEN)"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    health.add_argument("--tls-ca-file", type=Path, help="the server uses TLS signed by this CA")
    return parser


def build_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, with the command line's flags taking precedence."""
    return _settings_from(_parser().parse_args(argv))


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k != "command"
    }
    settings = Settings(**overrides)
    settings.resolved_auth_token()  # fail at start-up, not at the first call
    return settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Imported here: ``convsvc --help`` and this message work with the client install.
        from convsvc.app import run
        from convsvc.healthcheck import check_health, local_address
        from convsvc.logs import configure_logging
        from convsvc.storage.postgres_schema import migrate
    except ModuleNotFoundError as exc:
        print(f"convsvc: {exc.name} is not installed: {SERVER_EXTRA}", file=sys.stderr)
        return 2
    try:
        if args.command == "health":
            address = args.address or local_address(Settings().listen)
            return check_health(address, timeout=args.timeout, tls_ca_file=args.tls_ca_file)
        settings = _settings_from(args)
        if args.command == "migrate":
            return _migrate(settings, migrate)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"convsvc: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        if settings.use_uvloop:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                uvloop.run(run(settings))
                return 0
        asyncio.run(run(settings))
    except StorageError as exc:  # the store could not be opened: nothing was served
        print(f"convsvc: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _migrate(settings: Settings, migrate: Callable[..., Coroutine[Any, Any, list[str]]]) -> int:
    if settings.database_url is None:
        print("convsvc: migrate needs --database-url or CONVSVC_DATABASE_URL", file=sys.stderr)
        return 2
    try:
        applied = asyncio.run(
            migrate(settings.database_url.get_secret_value(), settings.resolved_database_password())
        )
    except StorageError as exc:
        print(f"convsvc: {settings.shown_database()}: {exc}", file=sys.stderr)
        return 1
    done = ", ".join(applied) if applied else "nothing to do: the schema is up to date"
    print(f"{settings.shown_database()}: {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
