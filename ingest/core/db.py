"""PostgreSQL access: the connection pool and the named queries of ``sql/queries.sql``."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any

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


QUERIES = load_queries(sql_dir() / "queries.sql")

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
    return _PARAMETER.sub(lambda m: literal(args[int(m.group(1)) - 1]), QUERIES[name])


# The group roles of sql/migrations/0002_roles.sql.
INGEST_ROLE = "eventpipe_ingest"
PARTITION_ADMIN_ROLE = "eventpipe_partition_admin"
ANALYST_ROLE = "eventpipe_analyst"


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
    """An asyncpg pool as an async context manager; ``q`` holds the named queries."""

    q = QUERIES

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

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        """Run named query ``name`` and return its rows."""
        return list(await self.pool.fetch(self.q[name], *args))

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        """Run named query ``name`` and return its first row."""
        return await self.pool.fetchrow(self.q[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        """Run named query ``name`` and return its status."""
        return str(await self.pool.execute(self.q[name], *args))

    async def role_for(self, role: str, *, copies: bool = False) -> str | None:
        """``role`` if this pool's user should ``SET ROLE`` to it, else None.

        Only a non-superuser member switches: a superuser or owner DSN (the
        embedded default) keeps its own rights. ``role`` empty means don't switch.
        With ``copies``, raises StartupError when the role lacks BYPASSRLS:
        PostgreSQL refuses COPY FROM into a table with row level security.
        """
        if not role:
            return None
        row = await self.fetchrow("switchable_role", role)
        if row is None:
            return None
        if copies and not row["bypass_rls"]:
            raise StartupError(
                f"role {role} lacks BYPASSRLS, which COPY into the event tables needs",
                hint=f"as a superuser: ALTER ROLE {role} BYPASSRLS",
            )
        return str(row["role"])
