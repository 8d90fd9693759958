"""Security of issues 7 and 18: roles and row level security, secrets, SQL identifiers, keys.

Runs on the session's real PostgreSQL and broker. Login users are made per
session with unique names (roles are cluster-wide) and dropped at the end.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import prometheus_client
import pytest
import structlog

from consumers.rows import BEHAVIOR
from consumers.runner import run_loaders
from ingest.collector.server import serving
from ingest.core import logs
from ingest.core.db import Database
from ingest.core.errors import StartupError
from ingest.core.identifiers import BadIdentifier, ident
from ingest.core.migrate import migrate
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials, ShopDirectory, ensure_shop
from ingest.partitions import (
    PartitionManager,
    add_months,
    detach_statement,
    month_start,
    partition_name,
)
from tests.conftest import wait_for
from tests.helpers import produce, record

ROOT = Path(__file__).resolve().parent.parent
UserFactory = Callable[..., Awaitable[str]]


def _as_user(dsn: str, user: str, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = f"{user}:{password}" if password else user
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


@pytest.fixture(scope="session")
async def login_user(pg_dsn: str) -> AsyncIterator[UserFactory]:
    """Makes LOGIN users granted the given roles; returns a DSN connecting as each."""
    made: list[str] = []

    async def make(*roles: str, password: str | None = None, superuser: bool = False) -> str:
        name = f"ep_sec_{uuid.uuid4().hex[:10]}"
        # Always a password: the server may not trust local connections (issue 18.6).
        password = password or f"pw{uuid.uuid4().hex}"
        conn = await asyncpg.connect(pg_dsn)
        try:
            attrs = " SUPERUSER" if superuser else ""
            await conn.execute(f"CREATE ROLE {name} LOGIN{attrs}")
            # a literal can't be a parameter of CREATE ROLE
            await conn.execute(f"ALTER ROLE {name} PASSWORD '{password}'")
            for role in roles:
                await conn.execute(f"GRANT {role} TO {name}")
        finally:
            await conn.close()
        made.append(name)
        return _as_user(pg_dsn, name, password)

    yield make
    conn = await asyncpg.connect(pg_dsn)
    try:
        for name in made + _CLI_ROLES:  # roles `eventpipe analysts grant` made too
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
                await conn.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")
    finally:
        await conn.close()


_CLI_ROLES: list[str] = []


def _role_of(dsn: str) -> str:
    """The user a DSN made by ``login_user`` connects as."""
    user = urlsplit(dsn).username
    assert user
    return user


def _new_role_name() -> str:
    """A role name for `analysts grant` to create; dropped with the login users."""
    name = f"ep_sec_{uuid.uuid4().hex[:10]}"
    _CLI_ROLES.append(name)
    return name


async def _analysts(pg_dsn: str, *argv: str) -> int:
    """``eventpipe analysts ARGV`` against ``pg_dsn`` (the schema owner's DSN)."""
    from ingest.cli import main

    flags = ["--postgres-dsn", pg_dsn, "--kafka-bootstrap", "127.0.0.1:1"]
    return await asyncio.to_thread(main, ["analysts", *argv, *flags])


async def _grant(db: Database, pg_dsn: str, role: str, shop_id: uuid.UUID) -> None:
    """Let ``role`` read ``shop_id``'s rows, as an operator does."""
    domain = await db.pool.fetchval("SELECT domain FROM shops WHERE id = $1", shop_id)
    assert await _analysts(pg_dsn, "grant", "--shop", domain, "--role", role) == 0


async def _insert_event(
    conn: asyncpg.Connection | asyncpg.Pool, shop_id: uuid.UUID, when: datetime
) -> uuid.UUID:
    event_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, page_url, "
        "\"timestamp\", received_at) VALUES ($1, $2, $3, 'click', 'https://x/', $4, $4)",
        event_id,
        shop_id,
        f"sec-{event_id}",
        when,
    )
    return event_id


# -- roles and row level security ------------------------------------------------------------


async def test_analyst_sees_only_its_shop(
    db: Database, pg_dsn: str, login_user: UserFactory
) -> None:
    now = datetime.now(UTC)
    await PartitionManager(db).ensure_months("behavior_events", {month_start(now)})
    shop_a, shop_b = [
        (await ensure_shop(db, f"rls-{uuid.uuid4().hex[:8]}.myshopify.com")).shop_id
        for _ in range(2)
    ]
    ids_a = [await _insert_event(db.pool, shop_a, now) for _ in range(3)]
    ids_b = [await _insert_event(db.pool, shop_b, now) for _ in range(2)]
    ids = ids_a + ids_b
    child = partition_name("behavior_events", month_start(now))
    dsn = await login_user("eventpipe_analyst")
    conn = await asyncpg.connect(dsn)
    try:
        by_parent = "SELECT event_id FROM behavior_events WHERE event_id = ANY($1::uuid[])"
        by_child = f"SELECT event_id FROM {ident(child)} WHERE event_id = ANY($1::uuid[])"
        # No shop granted: nothing at all, whatever the session sets.
        assert await conn.fetch(by_parent, ids) == []
        assert await conn.fetch(by_child, ids) == []
        await conn.execute("SELECT set_config('app.current_shop', $1, false)", str(shop_a))
        assert await conn.fetch(by_parent, ids) == []
        await _grant(db, pg_dsn, _role_of(dsn), shop_a)
        assert {r[0] for r in await conn.fetch(by_parent, ids)} == set(ids_a)
        assert {r[0] for r in await conn.fetch(by_child, ids)} == set(ids_a)
        await conn.execute("RESET app.current_shop")  # unset: every shop granted, here A
        assert {r[0] for r in await conn.fetch(by_parent, ids)} == set(ids_a)
        assert (
            await conn.fetchval("SELECT count(*) FROM behavior_events WHERE shop_id = $1", shop_b)
            == 0
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"DELETE FROM behavior_events WHERE event_id = '{ids_a[0]}'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _insert_event(conn, shop_a, now)
    finally:
        await conn.close()


async def _two_shops_rows(db: Database, table: str) -> dict[uuid.UUID, set[str]]:
    """Two rows of each of two new shops in ``table``: {shop id: the rows' keys}."""
    now = datetime.now(UTC)
    rows: dict[uuid.UUID, set[str]] = {}
    for _ in range(2):
        shop = (await ensure_shop(db, f"rls-{uuid.uuid4().hex[:8]}.myshopify.com")).shop_id
        keys = rows.setdefault(shop, set())
        for n in range(2):
            if table == "behavior_events":
                keys.add(str(await _insert_event(db.pool, shop, now)))
            elif table == "events":
                event_id = uuid.uuid4()
                await db.pool.execute(
                    "INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, "
                    "received_at) VALUES ($1, $2, 'a', 's', 'page_view', $3, $3)",
                    event_id,
                    shop,
                    now,
                )
                keys.add(str(event_id))
            elif table == "user_sessions":
                await db.pool.execute(
                    "INSERT INTO user_sessions (shop_id, session_id, landing_page, first_seen_at, "
                    "last_seen_at) VALUES ($1, $2, 'https://x/', $3, $3)",
                    shop,
                    f"s{n}-{shop}",
                    now,
                )
                keys.add(f"s{n}-{shop}")
            elif table == "identities":
                await db.pool.execute(
                    "INSERT INTO identities (shop_id, anon_id, user_id, first_seen_at, "
                    "last_seen_at) VALUES ($1, $2, 'u', $3, $3)",
                    shop,
                    f"a{n}-{shop}",
                    now,
                )
                keys.add(f"a{n}-{shop}")
            elif table in _ROLLUP_ROWS:
                key = f"{table}-{n}-{shop}"
                await db.pool.execute(_ROLLUP_ROWS[table], shop, key, now)
                keys.add(key)
            elif table in ("session_analytics", "friction_points"):
                # Eleven rage clicks of one session: over friction_points' HAVING COUNT(*) > 10.
                session = f"s{n}-{shop}"
                await db.pool.execute(
                    "INSERT INTO user_sessions (shop_id, session_id, landing_page, first_seen_at, "
                    "last_seen_at) VALUES ($1, $2, 'https://x/', $3, $3)",
                    shop,
                    session,
                    now,
                )
                for _ in range(11):
                    await db.pool.execute(
                        "INSERT INTO behavior_events (event_id, shop_id, session_id, event_type, "
                        'element_path, page_url, "timestamp", received_at) '
                        "VALUES ($1, $2, $3, 'rage_click', $3, 'https://x/', $4, $4)",
                        uuid.uuid4(),
                        shop,
                        session,
                        now,
                    )
                keys.add(session)
        if table == "shops":
            keys.add(str(shop))
    return rows


# The rollup tables (migration 0012): one row of shop $1 keyed $2 at time $3.
_ROLLUP_ROWS = {
    "daily_friction_summary": (
        "INSERT INTO daily_friction_summary (shop_id, date, element_path, event_type, "
        "event_count, unique_sessions, form_abandons, form_submits) "
        "VALUES ($1, $3::timestamptz::date, $2, 'rage_click', 1, 1, 0, 0)"
    ),
    "component_performance": (
        "INSERT INTO component_performance (shop_id, date, component_id, page_url, "
        "total_interactions, unique_users, clicks, rage_clicks, hesitations, conversions, "
        "first_seen, last_seen) VALUES ($1, $3::timestamptz::date, $2, 'https://x/', "
        "1, 1, 1, 0, 0, 0, $3, $3)"
    ),
    "results_aggregates": (
        "INSERT INTO results_aggregates (shop_id, experiment_id, variant, segment, updated_at) "
        "VALUES ($1, $2, 'control', 'desktop', $3)"
    ),
    "conversion_funnels": (
        "INSERT INTO conversion_funnels (shop_id, funnel_name, step_name, step_order, "
        "session_id, entered_at) VALUES ($1, 'checkout', 'cart', 1, $2, $3)"
    ),
}


_ANALYST_READS = {  # table -> the query of its keys an analyst runs
    "behavior_events": "SELECT event_id::text FROM behavior_events WHERE shop_id = ANY($1)",
    "events": "SELECT event_id::text FROM events WHERE shop_id = ANY($1)",
    "user_sessions": "SELECT session_id FROM user_sessions WHERE shop_id = ANY($1)",
    "identities": "SELECT anon_id FROM identities WHERE shop_id = ANY($1)",
    "shops": "SELECT id::text FROM shops WHERE id = ANY($1)",
    "daily_friction_summary": (
        "SELECT element_path FROM daily_friction_summary WHERE shop_id = ANY($1)"
    ),
    "component_performance": (
        "SELECT component_id FROM component_performance WHERE shop_id = ANY($1)"
    ),
    "results_aggregates": "SELECT experiment_id FROM results_aggregates WHERE shop_id = ANY($1)",
    "conversion_funnels": "SELECT session_id FROM conversion_funnels WHERE shop_id = ANY($1)",
    "session_analytics": "SELECT session_id FROM session_analytics WHERE shop_id = ANY($1)",
    "friction_points": "SELECT element_path FROM friction_points WHERE shop_id = ANY($1)",
}


@pytest.mark.parametrize("table", sorted(_ANALYST_READS))
async def test_analyst_reads_only_its_shops_rows_of_every_table(
    db: Database, pg_dsn: str, login_user: UserFactory, table: str
) -> None:
    """Two shops' rows in each table an analyst may read; the analyst of A sees A's only."""
    await PartitionManager(db).ensure_months("behavior_events", {month_start(datetime.now(UTC))})
    await PartitionManager(db).ensure_months("events", {month_start(datetime.now(UTC))})
    rows = await _two_shops_rows(db, table)
    shop_a, shop_b = rows
    dsn = await login_user()
    await _grant(db, pg_dsn, _role_of(dsn), shop_a)  # grants eventpipe_analyst too
    conn = await asyncpg.connect(dsn)
    try:
        for shop in (None, shop_a):  # unset: every shop granted; set: narrowed to one
            if shop is not None:
                await conn.execute("SELECT set_config('app.current_shop', $1, false)", str(shop))
            seen = {r[0] for r in await conn.fetch(_ANALYST_READS[table], [shop_a, shop_b])}
            assert seen == rows[shop_a]
        await conn.execute("SELECT set_config('app.current_shop', $1, false)", str(shop_b))
        assert await conn.fetch(_ANALYST_READS[table], [shop_a, shop_b]) == []
    finally:
        await conn.close()


async def _rows_of_every_table(
    db: Database, shop_id: uuid.UUID, when: datetime
) -> dict[str, set[str]]:
    """One row of ``shop_id`` in each table an analyst reads: {table: keys}."""
    event_id = uuid.uuid4()
    await db.pool.execute(
        "INSERT INTO events (event_id, shop_id, anon_id, session_id, event_type, ts, "
        "received_at) VALUES ($1, $2, 'a', 's', 'page_view', $3, $3)",
        event_id,
        shop_id,
        when,
    )
    session = f"trick-{uuid.uuid4().hex[:8]}"
    await db.pool.execute(
        "INSERT INTO user_sessions (shop_id, session_id, landing_page, first_seen_at, "
        "last_seen_at) VALUES ($1, $2, 'https://x/', $3, $3)",
        shop_id,
        session,
        when,
    )
    return {
        "behavior_events": {str(await _insert_event(db.pool, shop_id, when))},
        "events": {str(event_id)},
        "user_sessions": {session},
        "shops": {str(shop_id)},
    }


async def test_analyst_of_a_reads_no_row_of_b_whatever_the_session_does(
    db: Database, pg_dsn: str, login_user: UserFactory
) -> None:
    """Issue 18.1: the shop an analyst sees is the database's membership, not a setting.

    Before migration 0008 ``SET app.current_shop = '<B>'`` showed B's rows.
    """
    now = datetime.now(UTC)
    manager = PartitionManager(db)
    for table in ("behavior_events", "events"):
        await manager.ensure_months(table, {month_start(now)})
    a, b = [await ensure_shop(db, f"trick-{uuid.uuid4().hex[:8]}.myshopify.com") for _ in "ab"]
    rows_a = await _rows_of_every_table(db, a.shop_id, now)
    rows_b = await _rows_of_every_table(db, b.shop_id, now)
    dsn = await login_user()
    await _grant(db, pg_dsn, _role_of(dsn), a.shop_id)
    other = await login_user()  # another analyst, of B
    await _grant(db, pg_dsn, _role_of(other), b.shop_id)

    # A month the partition manager makes after the grant, with rows of both shops.
    later = add_months(month_start(now), 62)
    policy = await manager.policy("behavior_events")
    if await db.pool.fetchval("SELECT to_regclass($1)", partition_name(policy.table, later)):
        await db.pool.execute(f"DROP TABLE {ident(partition_name(policy.table, later))}")
    assert await manager.create(policy, later)
    when = datetime.combine(later.replace(day=3), datetime.min.time(), UTC)
    child_now = partition_name("behavior_events", month_start(now))
    child_later = partition_name("behavior_events", later)
    events_child = partition_name("events", month_start(now))
    for rows in (rows_a, rows_b):
        rows[child_now] = set(rows["behavior_events"])
        rows[events_child] = set(rows["events"])
    rows_a[child_later] = {str(await _insert_event(db.pool, a.shop_id, when))}
    rows_b[child_later] = {str(await _insert_event(db.pool, b.shop_id, when))}
    rows_a["behavior_events"] |= rows_a[child_later]
    rows_b["behavior_events"] |= rows_b[child_later]
    # The new partition got the parent's policy text, not an older one.
    quals = await db.pool.fetch(
        "SELECT tablename::text, qual FROM pg_policies WHERE policyname = 'analyst_own_shop' "
        "AND tablename = ANY($1::text[])",
        ["behavior_events", child_later],
    )
    assert len({q["qual"] for q in quals}) == 1 and len(quals) == 2

    keys = {
        "behavior_events": "event_id::text",
        "events": "event_id::text",
        "user_sessions": "session_id",
        "shops": "id::text",
        child_now: "event_id::text",
        child_later: "event_id::text",
        events_child: "event_id::text",
    }
    reads = {t: f"SELECT {k} FROM {ident(t)}" for t, k in keys.items()}
    of_b = set().union(*rows_b.values())
    nothing: dict[str, set[str]] = {t: set() for t in keys}
    conn = await asyncpg.connect(dsn)

    async def look(how: str, sql: dict[str, str] | None = None) -> dict[str, set[str]]:
        seen = {t: {r[0] for r in await conn.fetch(q)} for t, q in (sql or reads).items()}
        # Every row the analyst sees is A's (other tests' shops are not granted).
        for table, got in seen.items():
            assert not got & of_b, f"{how}: B's rows of {table}"
            assert got <= rows_a[table], f"{how}: rows of another shop in {table}"
        return seen

    async def copied(how: str) -> dict[str, set[str]]:
        seen = {}
        for table, query in reads.items():
            out = io.BytesIO()
            await conn.copy_from_query(query, output=out)
            seen[table] = set(out.getvalue().decode().split())
            assert not seen[table] & of_b, f"{how}: COPY shows B's rows of {table}"
        return seen

    try:
        assert await look("unset") == rows_a
        for trick in (
            f"SET app.current_shop = '{b.shop_id}'",
            f"SELECT set_config('app.current_shop', '{b.shop_id}', false)",
            f"SET SESSION app.current_shop = '{b.shop_id}'",
            f"SET app.current_shop = '{a.shop_id},{b.shop_id}'",
            "SET app.current_shop = 'not a uuid'",
        ):
            await conn.execute(trick)
            assert await look(trick) == nothing, trick  # narrowed to no shop
            assert await copied(trick) == nothing
        async with conn.transaction():
            await conn.execute(f"SET LOCAL app.current_shop = '{b.shop_id}'")
            assert await look("SET LOCAL") == nothing
        await conn.execute(f"SET app.current_shop = '{a.shop_id}'")
        assert await look("set to A") == rows_a
        assert await copied("set to A") == rows_a
        for reset in ("RESET app.current_shop", "RESET ALL", "SET app.current_shop = ''"):
            await conn.execute(reset)
            assert await look(reset) == rows_a

        # Roles: B's analyst, the others' roles, and the session's identity are out of reach.
        for refused in (
            f"SET ROLE {_role_of(other)}",
            f"SET SESSION AUTHORIZATION {_role_of(other)}",
            "SET ROLE eventpipe_ingest",
            "SET ROLE eventpipe_partition_admin",
            "SET ROLE eventpipe_collector",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(refused)
        # The group role it is a member of holds no shop: becoming it shows nothing.
        await conn.execute("SET ROLE eventpipe_analyst")
        assert await look("SET ROLE eventpipe_analyst") == nothing
        await conn.execute("RESET ROLE")

        # The membership can't be read, written or asked about for another role.
        for refused in (
            "SELECT * FROM analyst_shops",
            f"INSERT INTO analyst_shops (role_id, shop_id) SELECT oid, '{b.shop_id}' "
            f"FROM pg_roles WHERE rolname = current_user",
            "DELETE FROM analyst_shops",
            f"SELECT analyst_shop_ids('{_role_of(other)}')",
            "ALTER TABLE behavior_events DISABLE ROW LEVEL SECURITY",
            f"DROP POLICY analyst_own_shop ON {ident(child_later)}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(refused)

        # Views: none in the schema; a temporary one (if TEMP is allowed) is still its own.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "CREATE VIEW trick WITH (security_invoker = true) AS SELECT * FROM events"
            )
        for option in ("WITH (security_invoker = true)", ""):
            try:
                await conn.execute("DROP VIEW IF EXISTS pg_temp.trick")
                await conn.execute(
                    f"CREATE TEMP VIEW trick {option} AS "
                    "SELECT event_id::text FROM behavior_events UNION ALL "
                    "SELECT id::text FROM shops"
                )
            except asyncpg.InsufficientPrivilegeError:
                continue
            seen = {r[0] for r in await conn.fetch("SELECT * FROM trick")}
            assert seen == rows_a["behavior_events"] | rows_a["shops"]
    finally:
        await conn.close()


async def test_analyst_who_may_become_another_analyst_reaches_its_shops(
    db: Database, pg_dsn: str, login_user: UserFactory
) -> None:
    """The PostgreSQL model: a role reaches the shops of roles whose rights it has."""
    now = datetime.now(UTC)
    await PartitionManager(db).ensure_months("behavior_events", {month_start(now)})
    a, b = [await ensure_shop(db, f"team-{uuid.uuid4().hex[:8]}.myshopify.com") for _ in "ab"]
    event_a = await _insert_event(db.pool, a.shop_id, now)
    event_b = await _insert_event(db.pool, b.shop_id, now)
    dsn = await login_user()
    await _grant(db, pg_dsn, _role_of(dsn), a.shop_id)
    team = _new_role_name()
    assert await _analysts(pg_dsn, "grant", "--shop", b.domain, "--role", team) == 0
    await db.pool.execute(f"GRANT {ident(team)} TO {ident(_role_of(dsn))}")
    query = "SELECT event_id FROM behavior_events WHERE event_id = ANY($1::uuid[])"
    conn = await asyncpg.connect(dsn)
    try:
        # A member inherits the team's shops, as it inherits its privileges.
        assert {r[0] for r in await conn.fetch(query, [event_a, event_b])} == {event_a, event_b}
        await conn.execute(f"SET ROLE {ident(team)}")  # now only the team's
        assert {r[0] for r in await conn.fetch(query, [event_a, event_b])} == {event_b}
    finally:
        await conn.close()


async def test_every_analyst_policy_consults_the_membership(db: Database) -> None:
    """No policy, table or view an analyst reads is left to the session's own setting."""
    stale = await db.pool.fetch(
        "SELECT tablename::text FROM pg_policies "
        "WHERE 'eventpipe_analyst' = ANY(roles) AND schemaname = current_schema() "
        "AND (qual NOT LIKE '%analyst_shop_ids(CURRENT_USER)%' OR qual LIKE '%app.current_shop%')"
    )
    assert stale == []  # parents, partitions, detached and restored months alike
    unguarded = await db.pool.fetch(
        "SELECT c.relname::text FROM pg_class c "
        "WHERE c.relnamespace = current_schema()::regnamespace "
        "AND has_table_privilege('eventpipe_analyst', c.oid, 'SELECT') "
        "AND NOT (c.relkind IN ('r', 'p') AND c.relrowsecurity) "
        # A view runs as its owner unless security_invoker; a matview has no RLS at all.
        "AND NOT (c.relkind = 'v' AND coalesce(c.reloptions, '{}') && "
        "ARRAY['security_invoker=true', 'security_invoker=on'])"
    )
    assert unguarded == []


async def test_analysts_cli_grants_revokes_and_lists(
    db: Database, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shop = await ensure_shop(db, f"cli-{uuid.uuid4().hex[:8]}.myshopify.com")
    role = _new_role_name()
    try:
        assert await _analysts(pg_dsn, "grant", "--shop", shop.domain, "--role", role) == 0
        assert role in capsys.readouterr().out
        made = await db.pool.fetchrow(
            "SELECT rolcanlogin, pg_has_role(oid, 'eventpipe_analyst', 'MEMBER') AS analyst "
            "FROM pg_roles WHERE rolname = $1",
            role,
        )
        assert made is not None and not made["rolcanlogin"] and made["analyst"]  # NOLOGIN
        # Again: nothing changes, still one membership.
        assert await _analysts(pg_dsn, "grant", "--shop", shop.domain, "--role", role) == 0
        assert await _analysts(pg_dsn, "list", "--role", role, "--json") == 0
        listed = orjson.loads(capsys.readouterr().out.splitlines()[-1])
        assert [(m["role"], m["shop"], m["shop_id"], m["login"]) for m in listed] == [
            (role, shop.domain, str(shop.shop_id), False)
        ]
        assert await _analysts(pg_dsn, "list", "--shop", shop.domain) == 0
        assert role in capsys.readouterr().out
        assert await _analysts(pg_dsn, "revoke", "--shop", shop.domain, "--role", role) == 0
        assert await _analysts(pg_dsn, "revoke", "--shop", shop.domain, "--role", role) == 1
        capsys.readouterr()
        assert await _analysts(pg_dsn, "list", "--role", role, "--json") == 0
        assert orjson.loads(capsys.readouterr().out) == []

        # A new role with --password is a LOGIN with a SCRAM verifier, never the plain text.
        login, password = _new_role_name(), f"Pw{uuid.uuid4().hex}"
        argv = ["grant", "--shop", shop.domain, "--role", login, "--password", password]
        assert await _analysts(pg_dsn, *argv, "--json") == 0
        assert orjson.loads(capsys.readouterr().out)["created"] is True
        stored = await db.pool.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1", login
        )
        assert stored.startswith("SCRAM-SHA-256$") and password not in stored
        conn = await asyncpg.connect(_as_user(pg_dsn, login, password))
        await conn.close()
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grant", "--shop", "nope.example", "--role", "ep_sec_nobody"], "no shop nope.example"),
        (["grant", "--shop", "{shop}", "--role", "Bad-Name"], "refusing identifier"),
        (["grant", "--shop", "{shop}", "--role", 'x"; DROP TABLE shops; --'], "refusing"),
        (["grant", "--shop", "{shop}", "--role", "eventpipe_analyst"], "group or system role"),
        (["grant", "--shop", "{shop}", "--role", "pg_read_all_data"], "group or system role"),
        (["grant", "--shop", "{shop}", "--role", "{superuser}"], "bypasses row level security"),
        (["grant", "--shop", "{shop}", "--role", "{login}", "--password", "x"], "exists"),
        (["grant", "--shop", "{shop}", "--role", "{new}", "--password", "pé"], "password"),
        (["revoke", "--shop", "{shop}", "--role", "ep_sec_nobody_at_all"], "no role"),
        (["list", "--role", "Bad-Name"], "refusing identifier"),
    ],
)
async def test_analysts_cli_refuses_bad_input_in_one_line(
    db: Database,
    pg_dsn: str,
    login_user: UserFactory,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    shop = await ensure_shop(db, f"cli-{uuid.uuid4().hex[:8]}.myshopify.com")
    names = {
        "shop": shop.domain,
        "superuser": str(await db.pool.fetchval("SELECT current_user")),
        "login": _role_of(await login_user()),
        "new": _new_role_name(),
    }
    try:
        code = await _analysts(pg_dsn, *[a.format(**names) for a in argv])
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and message in err, err
    assert await db.pool.fetchval("SELECT to_regclass('shops')") is not None


async def test_scram_verifier_matches_postgresql(db: Database) -> None:
    """The verifier `analysts grant --password` stores is the one PostgreSQL makes itself."""
    from ingest.cli.analysts import scram_verifier

    role = _new_role_name()
    async with db.pool.acquire() as conn:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"CREATE ROLE {ident(role)} PASSWORD 'Secret-42 x'")
        stored = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
    salt = base64.b64decode(stored.split("$")[1].split(":")[1])
    assert scram_verifier("Secret-42 x", salt=salt) == stored


# -- the collector's role (issue 18.7) ---------------------------------------------------------


async def test_collector_role_reads_shops_and_keys_only(
    settings: Settings, db: Database, shop: ShopCredentials, login_user: UserFactory
) -> None:
    dsn = await login_user("eventpipe_collector")
    async with Database(dsn, max_size=2) as collector_db:
        directory = ShopDirectory(collector_db, ttl=0)
        found = await directory.by_write_key(shop.write_key)
        assert found is not None and found.id == shop.shop_id
        by_domain = await directory.by_domain(shop.domain)
        assert by_domain is not None and by_domain[1] == shop.webhook_secret  # HMAC needs it
        # The collector itself, on that login: a beacon is accepted.
        run = settings.model_copy(update={"postgres_dsn": dsn})
        body = {"events": [{"event_type": "click", "session_id": "s", "page_url": "https://x/"}]}
        async with (
            serving(run, collector_db, key_cache_s=0.5, spool=False) as (server, _),
            aiohttp.ClientSession() as http,
            http.post(f"{server.url}/v1/behavior?k={shop.write_key}", json=body) as resp,
        ):
            assert resp.status == 200
        now = datetime.now(UTC)
        await PartitionManager(db).ensure_months("behavior_events", {month_start(now)})
        child = partition_name("behavior_events", month_start(now))
        async with collector_db.pool.acquire() as conn:
            for sql in (
                "SELECT event_id FROM behavior_events LIMIT 1",
                f"SELECT event_id FROM {ident(child)} LIMIT 1",
                "SELECT event_id FROM events LIMIT 1",
                "SELECT shop_id FROM user_sessions LIMIT 1",
                "SELECT access_token_enc FROM shops LIMIT 1",
                "SELECT * FROM shops LIMIT 1",
                "SELECT * FROM dead_letters LIMIT 1",
                "SELECT * FROM loader_offsets LIMIT 1",
                "SELECT * FROM analyst_shops LIMIT 1",
                "SELECT analyst_shop_ids(current_user)",
                "UPDATE shops SET allowed_origins = NULL",
                "DELETE FROM shop_write_keys",
                f"INSERT INTO shop_write_keys (write_key, shop_id) VALUES ('x', '{shop.shop_id}')",
                "UPDATE shop_write_keys SET revoked_at = NULL",
                "SET ROLE eventpipe_ingest",
                "CREATE TABLE trick (x int)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await _insert_event(conn, shop.shop_id, now)


async def test_ingest_role_inserts_but_cannot_read_update_or_delete(
    db: Database, login_user: UserFactory
) -> None:
    now = datetime.now(UTC)
    await PartitionManager(db).ensure_months("behavior_events", {month_start(now)})
    child = partition_name("behavior_events", month_start(now))
    conn = await asyncpg.connect(await login_user("eventpipe_ingest"))
    try:
        for as_role in (False, True):  # as a member, and after SET ROLE (what the loader does)
            if as_role:
                await conn.execute("SET ROLE eventpipe_ingest")
            event_id = await _insert_event(conn, uuid.uuid4(), now)
            # The dedup key is readable (INSERT ... RETURNING of the staging path needs it).
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM behavior_events WHERE event_id = $1", event_id
                )
                == 1
            )
            for sql in (
                "SELECT page_url FROM behavior_events LIMIT 1",
                "SELECT * FROM behavior_events LIMIT 1",
                f"SELECT * FROM {ident(child)} LIMIT 1",
                "SELECT * FROM events LIMIT 1",
                "UPDATE behavior_events SET page_url = 'x'",
                "DELETE FROM behavior_events",
                f"DELETE FROM {ident(child)}",
                "TRUNCATE behavior_events",
                "SELECT webhook_secret FROM shops",
                f"ALTER TABLE behavior_events DETACH PARTITION {ident(child)}",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
    finally:
        await conn.close()
    assert await db.pool.fetchval(f"SELECT count(*) FROM {ident(child)}") > 0


async def test_partition_admin_creates_and_detaches_partitions(
    db: Database, login_user: UserFactory
) -> None:
    month = add_months(month_start(datetime.now(UTC)), 60)  # far from any other test's
    name = partition_name("behavior_events", month)
    async with Database(await login_user("eventpipe_partition_admin")) as admin:
        manager = PartitionManager(admin)
        assert await manager.create(await manager.policy("behavior_events"), month)
        facts = await db.pool.fetchrow(
            "SELECT pg_get_userbyid(relowner) AS owner, relrowsecurity, "
            "(SELECT array_agg(policyname::text ORDER BY policyname) FROM pg_policies "
            " WHERE tablename = $1) AS policies, "
            "has_table_privilege('eventpipe_ingest', $1, 'INSERT') AS ingest_insert, "
            "has_column_privilege('eventpipe_ingest', $1, 'event_id', 'SELECT') AS key_select, "
            "has_column_privilege('eventpipe_ingest', $1, 'page_url', 'SELECT') AS content_select "
            "FROM pg_class WHERE relname = $1",
            name,
        )
        assert facts["owner"] == "eventpipe_partition_admin" and facts["relrowsecurity"]
        assert facts["policies"] == [
            "analyst_own_shop",
            "ingest_insert",
            "ingest_returning",
            "partition_admin_all",
        ]
        assert facts["ingest_insert"] and facts["key_select"] and not facts["content_select"]
        await admin.pool.execute(detach_statement("behavior_events", name, concurrently=True))
        await admin.pool.execute(f"DROP TABLE {ident(name)}")
    assert await db.pool.fetchval("SELECT to_regclass($1)", name) is None


async def test_loader_as_member_of_ingest_and_partition_admin(
    settings: Settings, db: Database, shop: ShopCredentials, login_user: UserFactory
) -> None:
    dsn = await login_user("eventpipe_ingest", "eventpipe_partition_admin")
    loader_settings = settings.model_copy(update={"postgres_dsn": dsn, "loader_metrics_port": 0})
    async with Database(dsn) as member:
        assert await member.role_for(loader_settings.loader_role, copies=True) == "eventpipe_ingest"
        assert await member.role_for("") is None
    assert await db.role_for("eventpipe_ingest") is None  # superuser: keeps its own rights
    # A month the loader must create itself.
    month = add_months(month_start(datetime.now(UTC)), 3)
    child = partition_name("behavior_events", month)
    await db.pool.execute(f"DROP TABLE IF EXISTS {ident(child)}")
    later = datetime.combine(month.replace(day=2), datetime.min.time(), UTC).isoformat()
    session = f"sess-{uuid.uuid4().hex[:8]}"
    first = record(shop, session_id=session, event_type="page_view")
    others = [record(shop, session_id=session, event_type="page_view") for _ in range(3)]
    future = record(shop, timestamp=later)
    ids = [first["event_id"], future["event_id"]] + [o["event_id"] for o in others]

    async def count(event_id: object) -> int:
        return int(
            await db.pool.fetchval(
                "SELECT count(*) FROM behavior_events WHERE event_id = $1::uuid", event_id
            )
        )

    stop = asyncio.Event()
    task = asyncio.create_task(run_loaders(loader_settings, [BEHAVIOR], stop))
    try:
        await produce(settings, [orjson.dumps(first), orjson.dumps(future)])
        await wait_for(lambda: _all(count, [first["event_id"], future["event_id"]]), 30)
        # The first event again: the COPY meets a duplicate, the batch goes through staging.
        await produce(settings, [orjson.dumps(first), *(orjson.dumps(o) for o in others)])
        await wait_for(lambda: _all(count, ids), 30)
    finally:
        stop.set()
        await task
    assert [await count(i) for i in ids] == [1] * len(ids)
    owner = await db.pool.fetchval(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = $1", child
    )
    assert owner == "eventpipe_partition_admin"
    pages = await db.pool.fetchval(
        "SELECT page_count FROM user_sessions WHERE shop_id = $1 AND session_id = $2",
        shop.shop_id,
        session,
    )
    assert pages == 4  # folded in by two batches: the second one an ON CONFLICT DO UPDATE


async def _all(count: Callable[[object], Awaitable[int]], ids: list[object]) -> bool:
    return all([await count(i) for i in ids])


# -- secrets ---------------------------------------------------------------------------------


async def test_secrets_never_reach_logs_errors_or_metrics(
    settings: Settings,
    login_user: UserFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = f"S3cretPW{uuid.uuid4().hex[:8]}"
    dsn = await login_user(password=password, superuser=True)
    run = settings.model_copy(update={"postgres_dsn": dsn, "loader_metrics_port": 0})
    out = io.StringIO()
    caplog.set_level(logging.DEBUG)
    logs.configure("debug", "json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=out))
    texts: list[str] = []
    try:
        await migrate(dsn)
        async with Database(dsn) as db:
            shop = await ensure_shop(db, f"sec-{uuid.uuid4().hex[:8]}.myshopify.com")
            secret = shop.webhook_secret
            stop = asyncio.Event()
            loaders = asyncio.create_task(run_loaders(run, [BEHAVIOR], stop))
            try:
                async with (
                    serving(run, db, key_cache_s=0.5, spool=False) as (server, _),
                    aiohttp.ClientSession() as http,
                ):
                    event_id = str(uuid.uuid4())
                    async with http.post(
                        f"{server.url}/v1/behavior?k={shop.write_key}",
                        json={
                            "events": [
                                {
                                    "event_type": "click",
                                    "session_id": "s",
                                    "page_url": "https://x/",
                                    "event_id": event_id,
                                }
                            ]
                        },
                    ) as resp:
                        assert resp.status == 200
                    async with http.get(f"{server.url}/metrics") as resp:
                        texts.append(await resp.text())

                    async def loaded() -> bool:
                        return bool(
                            await db.pool.fetchval(
                                "SELECT count(*) FROM behavior_events WHERE event_id = $1::uuid",
                                event_id,
                            )
                        )

                    await wait_for(loaded, 30)
            finally:
                stop.set()
                await loaders
        # Errors: a wrong port, with the password in the DSN.
        wrong = dsn.replace(f":{urlsplit(dsn).port}/", ":1/")
        for attempt in (migrate(wrong), Database(wrong).start()):
            with pytest.raises(StartupError) as caught:
                await attempt
            texts += [str(caught.value), caught.value.message, caught.value.hint]
        # A careless log of a DSN, in structlog and in stdlib logging.
        structlog.get_logger("test").warning("connecting", dsn=dsn, error=ValueError(dsn))
        logging.getLogger("test").warning("connecting to %s", dsn)
    finally:
        structlog.reset_defaults()
    texts += [out.getvalue(), prometheus_client.generate_latest().decode()]
    texts += [r.getMessage() for r in caplog.records]
    everything = "\n".join(texts)
    assert "loader started" in everything and "***" in everything  # the capture worked
    assert password not in everything
    assert secret not in everything


def test_redact_covers_url_and_key_value_dsns() -> None:
    assert logs.redact("postgresql://u:p4ss@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert "p4ss" not in logs.redact("host=h user=u password=p4ss dbname=d")
    assert "p 4ss" not in logs.redact("host=h password='p 4ss' dbname=d")
    assert "p4ss" not in StartupError("at postgresql://u:p4ss@h/d", hint="password=p4ss").__str__()


# -- identifiers and SQL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        'x"; DROP TABLE shops; --',
        "Behavior_Events",
        "behavior events",
        "a" * 49,
        "",
        "1abc",
        "x;y",
        "évents",
        "x\x00",
    ],
)
def test_ident_refuses_hostile_names(name: str) -> None:
    with pytest.raises(BadIdentifier):
        ident(name)


def test_role_settings_refuse_hostile_names() -> None:
    with pytest.raises(ValueError):
        Settings(loader_role="x; DROP TABLE shops")
    assert Settings(loader_role="").loader_role == ""


# Modules allowed to build SQL text: only from identifiers checked by ident()
# (or catalog names quoted by quote()), texts quoted by literal(), integers and UTC
# timestamps they make themselves. Any other module must use the named queries of sql/queries.sql
# with bind parameters; a new SQL-building module fails here until reviewed.
SQL_BUILDERS = {
    "ingest/partitions/ddl.py",  # every statement of the partition manager
    "consumers/copy_writer.py",
    "ingest/stack/postgres.py",  # CREATE DATABASE of a constant name
}
_SQL_START = (
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE",
    "ALTER",
    "DROP",
    "GRANT",
    "COPY",
    "LOCK",
    "TRUNCATE",
    "WITH",
    "SET ",
    "RESET",
)
# literal: ingest.core.db's quoting of a text as PostgreSQL's quote_literal does (the
# table name an event_retimes pruning matches on).
_SAFE_CALLS = {"ident", "quote", "int", "_literal", "_ts_literal", "partition_name", "literal"}


def _sql_fstrings(path: Path) -> list[ast.JoinedStr]:
    tree = ast.parse(path.read_text())
    compared = {id(n) for c in ast.walk(tree) if isinstance(c, ast.Compare) for n in c.comparators}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr) or id(node) in compared:
            continue
        head = node.values[0] if node.values else None
        if isinstance(head, ast.Constant) and str(head.value).lstrip().startswith(_SQL_START):
            found.append(node)
    return found


def test_only_reviewed_modules_build_sql_from_names() -> None:
    builders = set()
    for path in sorted([*ROOT.glob("ingest/**/*.py"), *ROOT.glob("consumers/**/*.py")]):
        fstrings = _sql_fstrings(path)
        if not fstrings:
            continue
        rel = path.relative_to(ROOT).as_posix()
        builders.add(rel)
        for node in fstrings:
            for value in node.values:
                if not isinstance(value, ast.FormattedValue):
                    continue
                expr = value.value
                # A call must be one of the checking helpers; a bare name or attribute
                # is a fragment those helpers made earlier in the same function.
                if isinstance(expr, ast.Call):
                    func = expr.func
                    called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                    assert called in _SAFE_CALLS or called == "join", (
                        f"{rel}:{node.lineno}: SQL interpolates {ast.unparse(expr)}"
                    )
                else:
                    assert isinstance(expr, ast.Name | ast.Attribute | ast.BoolOp | ast.IfExp), (
                        f"{rel}:{node.lineno}: SQL interpolates {ast.unparse(expr)}"
                    )
    assert builders == SQL_BUILDERS


def test_request_handling_modules_use_named_queries_only() -> None:
    for name in (
        "collector/app.py",
        "collector/models.py",
        "collector/enrich.py",
        "collector/beacon.py",
        "core/shops.py",
        "core/producer.py",
    ):
        source = (ROOT / "ingest" / name).read_text()
        assert "execute(f" not in source and "fetch(f" not in source, name
        assert not _sql_fstrings(ROOT / "ingest" / name), name


# -- write keys --------------------------------------------------------------------------------


async def test_write_keys_rotate_and_revoked_key_is_refused_within_ttl(
    collector: str, db: Database, shop: ShopCredentials
) -> None:
    ttl = 0.5  # the collector fixture's ShopDirectory
    new_key = f"wk_{uuid.uuid4().hex}"
    await db.pool.execute(
        "INSERT INTO shop_write_keys (write_key, shop_id) VALUES ($1, $2)", new_key, shop.shop_id
    )
    body = {"events": [{"event_type": "click", "session_id": "s", "page_url": "https://x/"}]}
    async with aiohttp.ClientSession() as http:

        async def status(key: str) -> int:
            async with http.post(f"{collector}/v1/behavior?k={key}", json=body) as resp:
                return resp.status

        assert await status(shop.write_key) == 200
        assert await status(new_key) == 200
        await db.pool.execute(
            "UPDATE shop_write_keys SET revoked_at = now() WHERE write_key = $1", shop.write_key
        )
        revoked_at = asyncio.get_running_loop().time()

        async def refused() -> bool:
            return await status(shop.write_key) == 401

        await wait_for(refused, timeout=ttl + 1.0, interval=0.05)
        assert asyncio.get_running_loop().time() - revoked_at <= ttl + 1.0
        assert await status(new_key) == 200
        assert await status(shop.write_key) == 401


async def test_keys_cli_rotates_then_revokes_the_old_key(
    settings: Settings, db: Database, shop: ShopCredentials, capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest.cli import main

    flags = ["--shop", shop.domain, "--postgres-dsn", settings.dsn]
    flags += ["--kafka-bootstrap", settings.bootstrap]
    try:
        assert await asyncio.to_thread(main, ["keys", "rotate", *flags]) == 0
        new_key = capsys.readouterr().out.strip()
        directory = ShopDirectory(db, ttl=0)
        assert new_key != shop.write_key
        assert await directory.by_write_key(new_key) is not None
        assert await directory.by_write_key(shop.write_key) is not None  # both live
        assert await asyncio.to_thread(main, ["keys", "revoke", *flags]) == 0
        assert shop.write_key in capsys.readouterr().out
        assert await directory.by_write_key(shop.write_key) is None
        assert await directory.by_write_key(new_key) is not None
        assert await asyncio.to_thread(main, ["keys", "list", *flags]) == 0
        listing = capsys.readouterr().out
        assert "live" in listing and new_key in listing
        assert await asyncio.to_thread(main, ["keys", "revoke", *flags]) == 1  # none left to revoke
        unknown = ["keys", "list", "--shop", "nope.example", *flags[2:]]
        assert await asyncio.to_thread(main, unknown) == 2
    finally:
        structlog.reset_defaults()
