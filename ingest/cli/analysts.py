"""``eventpipe analysts grant|revoke|list``: which shops an analyst login may read.

Row level security shows an analyst the rows of the shops granted to its role
(``analyst_shops``, migration 0008), or to a role whose privileges it has;
``SET app.current_shop`` only narrows to one of them. ``grant`` creates the
role when missing (NOLOGIN unless ``--password``) and makes it a member of
``eventpipe_analyst``; ``revoke`` removes one shop (the role and its other
shops stay). Run as the schema owner or a superuser: creating roles needs
CREATEROLE, and granting ``eventpipe_analyst`` its ADMIN option.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import secrets
from typing import Any

import asyncpg
import orjson
from rich.console import Console
from rich.table import Table

from ingest.core.db import Database, queries
from ingest.core.errors import ConfigError
from ingest.core.identifiers import ident
from ingest.core.settings import Settings

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    Computed here, like psql's ``\\password``, so the plain password never
    travels in a statement's text (which server logs may keep). The password
    must be printable ASCII, for which SASLprep changes nothing.
    """
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    stored = hashlib.sha256(client_key).digest()
    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored)}:{b64(server_key)}"


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``analysts`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("analysts", help="grant, revoke and list analysts' shops")
    asub = parser.add_subparsers(dest="analysts_command", required=True)
    for name, func, text in (
        ("grant", grant_command, "let a role read a shop's rows (creates the role if missing)"),
        ("revoke", revoke_command, "take a shop from a role"),
        ("list", list_command, "memberships: which role reads which shop"),
    ):
        cmd = asub.add_parser(name, parents=[common], help=text)
        listing = name == "list"
        cmd.add_argument("--shop", required=not listing, help="the shop's domain")
        cmd.add_argument("--role", required=not listing, help="the analyst's role (login) name")
        if name == "grant":
            cmd.add_argument(
                "--password", help="make a new role a LOGIN with this password (else NOLOGIN)"
            )
        cmd.add_argument("--json", action="store_true", help="JSON output for scripts")
        cmd.set_defaults(func=func)


def _role_name(name: str) -> str:
    """``name`` if it may be given shops: a plain identifier, not one of the system's roles."""
    ident(name)  # BadIdentifier: a one-line error
    if name.startswith(("eventpipe_", "pg_")):
        # A membership of eventpipe_analyst would reach every analyst (all are members).
        raise ConfigError(
            f"refusing role {name}: a group or system role",
            hint="grant shops to an analyst's own login role",
        )
    return name


def _password(password: str | None) -> str | None:
    if password is None:
        return None
    if not password or not password.isascii() or not password.isprintable():
        raise ConfigError("refusing password: empty or not printable ASCII")
    return password


async def _shop_id(conn: asyncpg.Connection, domain: str) -> Any:
    row = await queries.fetchrow(conn, "shop_id_by_domain", domain)
    if row is None:
        raise ConfigError(f"no shop {domain}", hint="check the domain (shops.domain)")
    return row["id"]


def _refused(exc: asyncpg.PostgresError) -> ConfigError:
    """A server refusal as one line."""
    if isinstance(exc, asyncpg.UndefinedTableError):
        return ConfigError(
            "no analyst_shops table", hint="apply the migrations: `eventpipe migrate`"
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return ConfigError(
            f"refused by PostgreSQL: {exc}",
            hint="run as a superuser, or a role with CREATEROLE and ADMIN on eventpipe_analyst",
        )
    return ConfigError(f"refused by PostgreSQL: {exc}")


async def grant_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Give ``--role`` the shop ``--shop``, creating the role when missing."""
    role, password = _role_name(args.role), _password(args.password)
    created = False
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        try:
            async with db.pool.acquire() as conn, conn.transaction():
                shop_id = await _shop_id(conn, args.shop)
                row = await queries.fetchrow(conn, "analyst_role", role)
                if row is None:
                    verifier = scram_verifier(password) if password is not None else None
                    await conn.execute(
                        await queries.fetchval(conn, "analyst_create_role_ddl", role, verifier)
                    )
                    row = await queries.fetchrow(conn, "analyst_role", role)
                    assert row is not None
                    created = True
                elif password is not None:
                    raise ConfigError(
                        f"role {role} exists: --password only sets a new role's",
                        hint=f"as its admin: ALTER ROLE {role} PASSWORD ...",
                    )
                if row["rolsuper"] or row["rolbypassrls"]:
                    raise ConfigError(
                        f"refusing role {role}: it bypasses row level security",
                        hint="a membership would not confine it; use a plain login role",
                    )
                await conn.execute(await queries.fetchval(conn, "analyst_grant_group_ddl", role))
                await queries.execute(conn, "analyst_grant_shop", row["oid"], shop_id)
        except asyncpg.PostgresError as exc:
            raise _refused(exc) from exc
    if args.json:
        out = {"role": role, "shop": args.shop, "shop_id": str(shop_id), "created": created}
        console.print(orjson.dumps(out).decode(), soft_wrap=True, highlight=False, markup=False)
    else:
        made = f" (created, {'LOGIN' if password else 'NOLOGIN'})" if created else ""
        console.print(f"granted {args.shop} to {role}{made}", highlight=False, markup=False)
    return 0


async def revoke_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Take ``--shop`` from ``--role``; exit 1 when the role did not have it."""
    role = _role_name(args.role)
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        try:
            async with db.pool.acquire() as conn, conn.transaction():
                shop_id = await _shop_id(conn, args.shop)
                row = await queries.fetchrow(conn, "analyst_role", role)
                if row is None:
                    raise ConfigError(f"no role {role}")
                gone = await queries.fetch(conn, "analyst_revoke_shop", row["oid"], shop_id)
        except asyncpg.PostgresError as exc:
            raise _refused(exc) from exc
    if args.json:
        out = {"role": role, "shop": args.shop, "revoked": bool(gone)}
        console.print(orjson.dumps(out).decode(), soft_wrap=True, highlight=False, markup=False)
    else:
        text = f"revoked {args.shop} from {role}" if gone else f"{role} had no {args.shop}"
        console.print(text, highlight=False, markup=False)
    return 0 if gone else 1


async def list_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print the memberships, of ``--role`` and/or ``--shop`` when given."""
    role = _role_name(args.role) if args.role else None
    async with Database(settings.resolve_stack().dsn, max_size=1) as db:
        try:
            rows = await queries.fetch(db.pool, "analyst_memberships", role, args.shop)
        except asyncpg.PostgresError as exc:
            raise _refused(exc) from exc
    if args.json:
        out = [
            {
                "role": r["role"],
                "role_id": r["role_id"],
                "shop": r["domain"],
                "shop_id": str(r["shop_id"]),
                "granted_at": r["granted_at"].isoformat(),
                "login": r["can_login"],
            }
            for r in rows
        ]
        console.print(orjson.dumps(out).decode(), soft_wrap=True, highlight=False, markup=False)
        return 0
    table = Table("role", "shop", "granted", "login")
    for r in rows:
        name = r["role"] or f"(dropped role {r['role_id']})"
        login = "yes" if r["can_login"] else "no"
        table.add_row(name, r["domain"], f"{r['granted_at']:%Y-%m-%d %H:%M}", login)
    console.print(table)
    return 0
