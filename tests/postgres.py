"""A real PostgreSQL server for the tests, from the Debian package (see scripts/test).

Started once per session on a free loopback port; each test gets a database of its own. The
server refuses to run as root, so as root initdb and pg_ctl run as the ``postgres`` user, with
the data directory outside pytest's tmp dirs (mode 0700, unreachable for that user).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def postgres_bin_dir() -> Path:
    """Where the Debian package put initdb and pg_ctl (the newest version installed)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise RuntimeError(
        "PostgreSQL is not installed: scripts/test installs it (apt-get install postgresql)"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One postgres cluster: initdb'd once, started, stopped and killed by the tests."""

    bin_dir: Path
    root: Path
    port: int
    password: str = "convsvc-test-secret"
    """Over TCP every client must authenticate (SCRAM), as in production."""
    host: str = "127.0.0.1"
    wrapper: tuple[str, ...] = ()
    """Runs the server under another command (the partition tests: a network namespace)."""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return [*self.wrapper, "runuser", "-u", "postgres", "--", *args]
        return [*self.wrapper, *args]

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            self._as_owner(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def init(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        if self.host != "127.0.0.1":
            # Clients on other hosts (the partition tests' network) sign in with the password.
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\n")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={self.host} "
            "-c max_connections=300 -c fsync=on"
        )
        self._pg_ctl("-w", "-l", str(self.root / "postgres.log"), "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def crash(self) -> None:
        """Every postgres process dies at once, as in a power cut (recovery replays WAL)."""
        self._pg_ctl("-w", "-m", "immediate", "stop")

    def admin_dsn(self, database: str = "postgres", *, with_password: bool = True) -> str:
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://postgres{secret}@{self.host}:{self.port}/{database}"

    def create_database(self, *, with_password: bool = True) -> str:
        """A fresh, empty database; returns its DSN (without the password when asked).

        Made with psql, so that test environments without asyncpg (the OpenHands venvs) can
        run clusters too."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-q",
                "-c",
                f'CREATE DATABASE "{name}"',
            ],
            env={**os.environ, "PGPASSWORD": self.password},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return self.admin_dsn(name, with_password=with_password)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="convsvc-pg-"))
    os.chmod(root, 0o755)
    server = PostgresServer(postgres_bin_dir(), root, _free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.crash()
        shutil.rmtree(root, ignore_errors=True)
