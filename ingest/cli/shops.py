"""``eventpipe shops add|list|show|set|uninstall``: onboard a shop, change what it may do,
and uninstall it.

``add`` prints the shop's first write key (public: it goes in the storefront's
pages) and its webhook secret (private: it goes in the Shopify app's settings).
``show`` never prints the secret unless asked with ``--show-secret``. Keys are
rotated and revoked with ``eventpipe keys``. ``uninstall`` sets ``uninstalled_at``
and revokes every live key (collectors refuse them within
``EVENTPIPE_WRITE_KEY_CACHE_SECONDS``); ``partitions maintain`` deletes or
anonymises the shop's rows once its retention has passed (source document 004).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from ingest.core.db import Database, queries
from ingest.core.errors import ConfigError
from ingest.core.settings import Settings
from ingest.core.shops import (
    BOT_POLICIES,
    IP_POLICIES,
    SETTING_KEYS,
    UNINSTALLED_DATA,
    ShopInfo,
    create_shop,
    list_shops,
    shop_secret,
    show_shop,
    update_shop,
    valid_domain,
)


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``shops`` and its subcommands (each takes the ``common`` flags)."""
    parser = sub.add_parser("shops", help="add shops, list them, show and change one")
    ssub = parser.add_subparsers(dest="shops_command", required=True)

    add = ssub.add_parser(
        "add", parents=[common], help="create a shop; prints its write key and webhook secret"
    )
    add.add_argument("domain", help="the shop's domain, e.g. example.myshopify.com")
    add.add_argument("--webhook-secret", help="the Shopify app's secret (default: generated)")
    _origins(add)
    _retention(add)
    add.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    add.set_defaults(func=add_command)

    lst = ssub.add_parser("list", parents=[common], help="every shop, by domain")
    lst.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    lst.set_defaults(func=list_command)

    show = ssub.add_parser("show", parents=[common], help="one shop (not its secret)")
    show.add_argument("domain")
    show.add_argument("--show-secret", action="store_true", help="also print the webhook secret")
    show.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    show.set_defaults(func=show_command)

    change = ssub.add_parser(
        "set",
        parents=[common],
        help="replace a shop's allowed origins, set its retention and privacy settings",
    )
    change.add_argument("domain")
    _origins(change, "replaces the list")
    change.add_argument(
        "--clear-origins", action="store_true", help="allow beacons from any origin"
    )
    _retention(change)
    _privacy(change)
    change.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    change.set_defaults(func=set_command)

    gone = ssub.add_parser(
        "uninstall",
        parents=[common],
        help="mark a shop uninstalled and revoke its keys; its rows go after its retention",
    )
    gone.add_argument("domain")
    gone.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    gone.set_defaults(func=uninstall_command)


def _origins(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--allowed-origin",
        action="append",
        dest="allowed_origins",
        metavar="URL",
        help="an origin (scheme://host[:port]) that may post beacons; repeat for more"
        + (f"; {extra}" if extra else "")
        + " (none: any origin)",
    )


def _privacy(parser: argparse.ArgumentParser) -> None:
    """The privacy settings (README, "A shop's privacy settings"); ``default`` removes
    one from the shop, so that the collector's own setting applies."""
    group = parser.add_argument_group("privacy settings ('default': the collector's)")
    group.add_argument("--ip-policy", choices=[*IP_POLICIES, "default"])
    group.add_argument("--consent-required", choices=["yes", "no", "default"])
    group.add_argument("--bot-policy", choices=[*BOT_POLICIES, "default"])
    group.add_argument(
        "--bot-deny",
        action="append",
        dest="bot_deny_list",
        metavar="TEXT",
        help="a User-Agent substring this shop counts as a bot; repeat for more (replaces "
        "the list)",
    )
    group.add_argument(
        "--clear-bot-deny-list", action="store_true", help="no User-Agents of the shop's own"
    )
    group.add_argument(
        "--uninstalled-data",
        choices=[*UNINSTALLED_DATA, "default"],
        help="what partitions maintain does with the rows once the shop is uninstalled",
    )


def _privacy_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``set`` changes: a value, or None to remove it (its default applies)."""
    if args.clear_bot_deny_list and args.bot_deny_list:
        raise ConfigError(
            "--clear-bot-deny-list and --bot-deny contradict each other", hint="give one of them"
        )
    given: dict[str, Any] = {
        "ip_policy": args.ip_policy,
        "consent_required": {"yes": True, "no": False, "default": "default"}.get(
            args.consent_required or ""
        ),
        "bot_policy": args.bot_policy,
        "uninstalled_data": args.uninstalled_data,
        "bot_deny_list": "default" if args.clear_bot_deny_list else args.bot_deny_list,
    }
    return {k: None if v == "default" else v for k, v in given.items() if v is not None}


def _retention(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retention-days",
        type=int,
        metavar="N",
        help="keep this shop's events N days (shorter than the partition policy's)",
    )


async def add_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Create the shop; print its write key and webhook secret."""
    async with Database(_dsn(settings), max_size=1) as db:
        created = await create_shop(
            db,
            args.domain,
            webhook_secret=args.webhook_secret,
            allowed_origins=args.allowed_origins,
            retention_days=args.retention_days,
        )
    if args.json:
        _print_json(
            console,
            {
                "shop_id": str(created.shop_id),
                "domain": created.domain,
                "write_key": created.write_key,
                "webhook_secret": created.webhook_secret,
            },
        )
    else:
        console.print(
            f"created {created.domain} ({created.shop_id})\n"
            f"  write key       {created.write_key}\n"
            f"  webhook secret  {created.webhook_secret}",
            highlight=False,
        )
    return 0


async def list_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print every shop."""
    async with Database(_dsn(settings), max_size=1) as db:
        shops = await list_shops(db)
    if args.json:
        _print_json(console, [_plain(s) for s in shops])
        return 0
    # Domains and ids are what an operator copies: never wrapped, the other columns give way.
    table = Table(
        Column("domain", no_wrap=True),
        Column("shop id", no_wrap=True),
        "origins",
        "retention",
        "live keys",
        "installed",
    )
    for s in shops:
        table.add_row(
            s.domain + (" (uninstalled)" if s.uninstalled_at else ""),
            str(s.id),
            _origins_text(s),
            f"{s.retention_days} days" if s.retention_days is not None else "policy",
            str(s.live_keys),
            s.installed_at[:16].replace("T", " "),
        )
    console.print(table)
    return 0


async def show_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print one shop; its webhook secret only with ``--show-secret``."""
    async with Database(_dsn(settings), max_size=1) as db:
        shop = await show_shop(db, args.domain)
        secret = await shop_secret(db, args.domain) if args.show_secret else None
    _print_shop(console, shop, args.json, secret)
    return 0


async def set_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Change the shop; print it as it is now."""
    async with Database(_dsn(settings), max_size=1) as db:
        shop = await update_shop(
            db,
            args.domain,
            allowed_origins=args.allowed_origins,
            clear_origins=args.clear_origins,
            retention_days=args.retention_days,
            settings=_privacy_changes(args),
        )
    _print_shop(console, shop, args.json, None)
    return 0


async def uninstall_command(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Set ``uninstalled_at`` (kept from an earlier uninstall) and revoke every live key."""
    domain = valid_domain(args.domain)
    async with Database(_dsn(settings), max_size=1) as db:
        row = await queries.fetchrow(db.pool, "shop_uninstall", domain)
    if row is None or row["id"] is None:
        raise ConfigError(f"no shop {domain}", hint="see the shops with `eventpipe shops list`")
    days = settings.uninstalled_retention_days
    done = {
        "domain": domain,
        "shop_id": str(row["id"]),
        "uninstalled_at": row["uninstalled_at"].isoformat(timespec="seconds"),
        "keys_revoked": int(row["revoked"]),
        "data": settings.uninstalled_data,
    }
    if args.json:
        _print_json(console, done)
        return 0
    console.print(
        f"uninstalled {domain} at {done['uninstalled_at']}; {done['keys_revoked']} key(s) "
        f"revoked (collectors refuse them within {settings.write_key_cache_seconds:g} s)\n"
        f"  its rows: {settings.uninstalled_data} by `partitions maintain` once its "
        f"data_retention_days (else {days} days) have passed",
        highlight=False,
    )
    return 0


def _dsn(settings: Settings) -> str:
    # A DSN is all these commands need: no broker, so no stack to resolve when one is given.
    return settings.postgres_dsn or settings.resolve_stack().dsn


def _plain(shop: ShopInfo) -> dict[str, Any]:
    return {**asdict(shop), "id": str(shop.id)}


def _print_json(console: Console, value: object) -> None:
    # Plain print, as ``partitions --json`` does: no wrapping or markup for a script to undo.
    print(json.dumps(value, indent=2))


def _setting_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _origins_text(shop: ShopInfo) -> str:
    return "any" if shop.allowed_origins is None else " ".join(shop.allowed_origins) or "none"


def _print_shop(console: Console, shop: ShopInfo, as_json: bool, secret: str | None) -> None:
    if as_json:
        plain = _plain(shop)
        if secret is not None:
            plain["webhook_secret"] = secret
        _print_json(console, plain)
        return
    lines = [
        f"{shop.domain} ({shop.id})",
        f"  allowed origins  {_origins_text(shop)}",
        "  retention        "
        + (f"{shop.retention_days} days" if shop.retention_days is not None else "the policy's"),
        f"  live write keys  {shop.live_keys}  (eventpipe keys list --shop {shop.domain})",
        f"  installed        {shop.installed_at}",
    ]
    for key in SETTING_KEYS:
        value = shop.privacy.get(key)
        shown = "the collector's" if value is None else _setting_text(value)
        lines.append(f"  {key:<17}{shown}")
    if shop.uninstalled_at:
        lines.append(f"  uninstalled      {shop.uninstalled_at}")
    if secret is not None:
        lines.append(f"  webhook secret   {secret}")
    console.print("\n".join(lines), highlight=False)
