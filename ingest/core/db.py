"""PostgreSQL access: the connection pool, and the named queries of ``sql/queries.sql``."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import structlog

from ingest.core.errors import StartupError
from ingest.core.logs import redact
from ingest.core.service import Service

log = structlog.get_logger(__name__)


def sql_dir() -> Path:
    """The directory of the ``sql`` package (migrations, named queries), found by import:
    the same in a source checkout and an installed wheel."""
    return Path(str(importlib.resources.files("sql")))


def load_queries(path: Path) -> dict[str, str]:
    """Parse a file of ``-- name: x`` blocks into ``{name: sql}``."""
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        if name.strip() in queries:
            raise ValueError(f"{path}: two queries are named {name.strip()}")
        queries[name.strip()] = body.strip().rstrip(";")
    return queries


Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection  # where a query runs


class Queries:
    """The named queries of ``sql/queries.sql``, and the one way to run one: on a pool
    or a connection (``queries.fetch(conn, "name", *args)``), or as text (``sql``)."""

    def __init__(self, path: Path) -> None:
        self._sql = load_queries(path)

    def sql(self, name: str) -> str:
        """The text of named query ``name``."""
        return self._sql[name]

    def __contains__(self, name: object) -> bool:
        return name in self._sql

    async def fetch(self, on: Executor, name: str, *args: Any) -> list[asyncpg.Record]:
        """Its rows."""
        return list(await on.fetch(self._sql[name], *args))

    async def fetchrow(self, on: Executor, name: str, *args: Any) -> asyncpg.Record | None:
        """Its first row."""
        return await on.fetchrow(self._sql[name], *args)

    async def fetchval(self, on: Executor, name: str, *args: Any) -> Any:
        """The first value of its first row."""
        return await on.fetchval(self._sql[name], *args)

    async def execute(self, on: Executor, name: str, *args: Any) -> str:
        """Run it; its status."""
        return str(await on.execute(self._sql[name], *args))

    async def executemany(self, on: Executor, name: str, args: Iterable[Sequence[Any]]) -> None:
        """Run it once per argument tuple."""
        await on.executemany(self._sql[name], args)


queries = Queries(sql_dir() / "queries.sql")

_PARAMETER = re.compile(r"\$(\d+)")


def literal(value: str | int | list[int]) -> str:
    """``value`` as an SQL literal, quoted as PostgreSQL's ``quote_literal`` does.

    Hand-written: asyncpg's quoting helper is private (``asyncpg.utils``), and
    the few literals needed here are texts of the settings and lists of ints.
    """
    if isinstance(value, bool):
        raise TypeError("no boolean literals")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "'{" + ",".join(str(int(v)) for v in value) + "}'"
    if "\x00" in value:
        raise ValueError("PostgreSQL text cannot hold NUL")
    quoted = value.replace("'", "''")
    if "\\" in value:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def inline(name: str, *args: str | int | list[int]) -> str:
    """Named query ``name`` with its parameters written in as literals.

    For statements sent together as one plain-text query, one round trip for
    several statements (the extended protocol, which takes parameters, runs
    one statement per round trip).
    """
    return _PARAMETER.sub(lambda m: literal(args[int(m.group(1)) - 1]), queries.sql(name))


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """One connection, with a clear StartupError when the server can't be reached."""
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StartupError(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {exc}",
            hint="check EVENTPIPE_POSTGRES_DSN, or start the stack with `eventpipe up`",
        ) from exc


class Database(Service):
    """An asyncpg pool as an async context manager (run named queries on ``pool``
    with ``queries``)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self._server_settings = server_settings or {"timezone": "UTC"}
        self._min = min_size
        self._max = max_size
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        """Open the pool."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min,
                max_size=self._max,
                server_settings=self._server_settings,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StartupError(
                f"cannot connect to PostgreSQL at {redact(self.dsn)}: {exc}",
                hint="check EVENTPIPE_POSTGRES_DSN, or start the stack with `eventpipe up`",
            ) from exc

    async def stop(self) -> None:
        """Close the pool, letting queries in flight finish."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        assert self._pool is not None, "Database not started"
        return self._pool

    async def role_for(self, role: str, *, copies: bool = False) -> str | None:
        """``role`` if this pool's user should ``SET ROLE`` to it, else None.

        Only a non-superuser member switches: a superuser or owner DSN (the
        embedded default) keeps its own rights. ``role`` empty means don't switch.
        With ``copies``, raises StartupError when the role lacks BYPASSRLS:
        PostgreSQL refuses COPY FROM into a table with row level security.
        """
        if not role:
            return None
        row = await queries.fetchrow(self.pool, "switchable_role", role)
        if row is None:
            return None
        if copies and not row["bypass_rls"]:
            raise StartupError(
                f"role {role} lacks BYPASSRLS, which COPY into the event tables needs",
                hint=f"as a superuser: ALTER ROLE {role} BYPASSRLS",
            )
        return str(row["role"])
