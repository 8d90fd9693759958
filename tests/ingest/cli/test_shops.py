"""``eventpipe shops``: onboard a shop, list, show and change it, against the session's
PostgreSQL; bad input is one line and a non-zero exit."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import structlog

from ingest.cli.main import main
from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.settings import Settings
from ingest.core.shops import ShopDirectory

Run = Callable[..., Awaitable[int]]


@pytest.fixture
async def run(db: Database) -> AsyncIterator[Run]:
    """main() in a thread with the session DSN; main() reconfigures structlog: restored."""
    saved = structlog.get_config()

    async def cli(*argv: str) -> int:
        return await asyncio.to_thread(functools.partial(main, [*argv, "--postgres-dsn", db.dsn]))

    yield cli
    structlog.configure(**saved)


def _domain() -> str:
    return f"onboard-{uuid.uuid4().hex[:8]}.myshopify.com"


async def test_add_prints_a_working_write_key_and_the_secret(
    run: Run, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    domain = _domain()
    assert (
        await run(
            "shops",
            "add",
            domain,
            "--webhook-secret",
            "s3cret-value",
            "--allowed-origin",
            "https://Shop.Example/",
            "--allowed-origin",
            "http://localhost:3000",
            "--retention-days",
            "30",
            "--json",
        )
        == 0
    )
    created = json.loads(capsys.readouterr().out)
    assert created["domain"] == domain and created["webhook_secret"] == "s3cret-value"
    assert created["write_key"].startswith("wk_")
    directory = ShopDirectory(db, ttl=0)
    shop = await directory.by_write_key(created["write_key"])
    assert shop is not None and str(shop.id) == created["shop_id"]
    assert shop.allowed_origins == ("https://shop.example", "http://localhost:3000")
    assert await directory.by_domain(domain) == (shop, "s3cret-value")

    assert await run("shops", "show", domain, "--json") == 0
    out = capsys.readouterr().out
    assert "s3cret-value" not in out
    shown = json.loads(out)
    assert shown["retention_days"] == 30 and shown["live_keys"] == 1
    assert await run("shops", "show", domain) == 0
    assert "s3cret-value" not in capsys.readouterr().out
    assert await run("shops", "show", domain, "--show-secret") == 0
    assert "s3cret-value" in capsys.readouterr().out

    assert await run("shops", "list", "--json") == 0
    out = capsys.readouterr().out
    assert "s3cret-value" not in out
    assert domain in [s["domain"] for s in json.loads(out)]
    assert await run("shops", "list") == 0
    assert domain in capsys.readouterr().out

    # the retention the CLI set is the one partition maintenance enforces
    days = await db.pool.fetchval(
        "SELECT days FROM (SELECT id, floor((settings->>'data_retention_days')::numeric)::int "
        "AS days FROM shops) s WHERE id = $1",
        shop.id,
    )
    assert days == 30


async def test_set_replaces_and_clears_origins_and_sets_retention(
    run: Run, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    domain = _domain()
    assert await run("shops", "add", domain) == 0
    out = capsys.readouterr().out
    assert "write key" in out and "webhook secret" in out
    assert (
        await run("shops", "set", domain, "--allowed-origin", "https://a.example:8443", "--json")
        == 0
    )
    assert json.loads(capsys.readouterr().out)["allowed_origins"] == ["https://a.example:8443"]
    assert await run("shops", "set", domain, "--retention-days", "7", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["retention_days"] == 7
    assert shown["allowed_origins"] == ["https://a.example:8443"]  # untouched
    assert await run("shops", "set", domain, "--clear-origins", "--json") == 0
    assert json.loads(capsys.readouterr().out)["allowed_origins"] is None


async def test_an_origin_set_by_the_cli_is_the_one_the_collector_accepts(
    run: Run, settings: Settings, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The normalised origin matches the browser's Origin header; another origin is refused."""
    import aiohttp

    domain = _domain()
    assert (
        await run("shops", "add", domain, "--allowed-origin", "HTTPS://Shop.Example/", "--json")
        == 0
    )
    key = json.loads(capsys.readouterr().out)["write_key"]
    body = b'[{"event_type":"page_view","session_id":"s-cli","page_url":"https://shop.example/"}]'
    async with serving(settings, db, key_cache_s=0) as (server, _), aiohttp.ClientSession() as http:
        for origin, expected in (("https://shop.example", 200), ("https://evil.example", 403)):
            async with http.post(
                f"{server.url}/v1/behavior?k={key}",
                data=body,
                headers={"Origin": origin, "Content-Type": "text/plain"},
            ) as resp:
                assert resp.status == expected, (origin, await resp.text())


async def test_set_changes_the_privacy_settings_and_default_removes_them(
    run: Run, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    domain = _domain()
    assert await run("shops", "add", domain, "--retention-days", "9") == 0
    capsys.readouterr()
    argv = ["--ip-policy", "remove", "--consent-required", "yes", "--bot-policy", "flag"]
    argv += ["--bot-deny", " MyMonitor ", "--bot-deny", "scraper", "--uninstalled-data"]
    assert await run("shops", "set", domain, *argv, "anonymize", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["privacy"] == {
        "ip_policy": "remove",
        "consent_required": True,
        "bot_policy": "flag",
        "bot_deny_list": ["MyMonitor", "scraper"],
        "uninstalled_data": "anonymize",
    }
    assert shown["retention_days"] == 9  # untouched
    # What the collector and the partition manager read is the stored JSON.
    stored = json.loads(
        await db.pool.fetchval("SELECT settings FROM shops WHERE domain = $1", domain)
    )
    assert stored == {**shown["privacy"], "data_retention_days": 9}
    assert await run("shops", "show", domain) == 0
    text = capsys.readouterr().out
    assert "ip_policy        remove" in text and "bot_deny_list    MyMonitor, scraper" in text
    assert "consent_required yes" in text
    argv = ["--ip-policy", "default", "--consent-required", "no", "--clear-bot-deny-list"]
    assert await run("shops", "set", domain, *argv, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["privacy"] == {
        "consent_required": False,
        "bot_policy": "flag",
        "uninstalled_data": "anonymize",
    }
    assert await run("shops", "show", domain) == 0
    assert "ip_policy        the collector's" in capsys.readouterr().out


async def test_a_deny_list_set_by_the_cli_drops_that_agent_at_the_collector(
    run: Run, settings: Settings, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    import aiohttp

    domain = _domain()
    assert await run("shops", "add", domain, "--json") == 0
    key = json.loads(capsys.readouterr().out)["write_key"]
    assert (
        await run("shops", "set", domain, "--bot-deny", "AcmeMonitor", "--bot-policy", "drop") == 0
    )
    body = b'[{"event_type":"page_view","session_id":"s-deny","page_url":"https://shop.example/"}]'
    async with serving(settings, db, key_cache_s=0) as (server, _), aiohttp.ClientSession() as http:
        answers = []
        for agent in (
            "Mozilla/5.0 acmemonitor/2.1",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        ):
            async with http.post(
                f"{server.url}/v1/behavior?k={key}",
                data=body,
                headers={"Content-Type": "text/plain", "User-Agent": agent},
            ) as resp:
                assert resp.status == 200
                answers.append(await resp.json())
    assert answers[0]["accepted"] == 0 and "(deny_list)" in answers[0]["dropped"]
    assert answers[1]["accepted"] == 1


BAD = [
    (["shops", "add", "EXISTING"], "exists"),
    (["shops", "add", "not a domain"], "not a shop domain"),
    (["shops", "add", "NEW", "--allowed-origin", "https://shop.example/path"], "not an origin"),
    (["shops", "add", "NEW", "--allowed-origin", "ftp://shop.example"], "not an origin"),
    (["shops", "add", "NEW", "--allowed-origin", "shop.example"], "not an origin"),
    (["shops", "add", "NEW", "--allowed-origin", "https://u:p@shop.example"], "not an origin"),
    (["shops", "add", "NEW", "--allowed-origin", "https://shop.example:99999"], "not an origin"),
    (["shops", "add", "NEW", "--allowed-origin", "https://shop.example?x=1"], "not an origin"),
    (["shops", "add", "NEW", "--retention-days", "0"], "at least 1"),
    (["shops", "add", "NEW", "--webhook-secret", ""], "webhook-secret"),
    (["shops", "show", "NEW"], "no shop"),
    (["shops", "set", "NEW", "--retention-days", "5"], "no shop"),
    (["shops", "set", "EXISTING", "--retention-days", "-3"], "at least 1"),
    (["shops", "set", "EXISTING", "--allowed-origin", "https://x/y"], "not an origin"),
    (["shops", "set", "EXISTING"], "nothing to change"),
    (["shops", "set", "EXISTING", "--bot-deny", " "], "bot_deny_list entry"),
    (["shops", "set", "EXISTING", "--bot-deny", "x" * 201], "bot_deny_list entry"),
    (["shops", "set", "EXISTING", "--bot-deny", "a", "--clear-bot-deny-list"], "contradict"),
    (["shops", "set", "NEW", "--bot-policy", "keep"], "no shop"),
    (
        ["shops", "set", "EXISTING", "--clear-origins", "--allowed-origin", "https://a.example"],
        "contradict",
    ),
]


async def test_bad_input_is_one_clear_line_and_a_nonzero_exit(
    run: Run, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = _domain()
    assert await run("shops", "add", existing) == 0
    capsys.readouterr()
    for argv, needle in BAD:
        fresh = _domain()
        args = [existing if a == "EXISTING" else fresh if a == "NEW" else a for a in argv]
        code = await run(*args)
        err = capsys.readouterr().err
        assert code != 0, args
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (args, err)
        assert await db.pool.fetchval("SELECT count(*) FROM shops WHERE domain = $1", fresh) == 0


async def test_uninstall_revokes_the_keys_the_collector_then_refuses(
    run: Run, settings: Settings, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shops uninstall`: uninstalled_at set, every live key revoked; a real collector with
    a 1 s key cache takes the key before and refuses it within that interval after."""
    import aiohttp

    domain = _domain()
    assert await run("shops", "add", domain, "--json") == 0
    key = json.loads(capsys.readouterr().out)["write_key"]
    assert await run("keys", "rotate", "--shop", domain) == 0  # two live keys
    capsys.readouterr()
    body = b'[{"event_type":"page_view","session_id":"s-un","page_url":"https://shop.example/"}]'
    cache_s = 1.0
    async with (
        serving(settings, db, key_cache_s=cache_s) as (server, _),
        aiohttp.ClientSession() as http,
    ):

        async def post() -> int:
            async with http.post(
                f"{server.url}/v1/behavior?k={key}",
                data=body,
                headers={"Content-Type": "text/plain"},
            ) as resp:
                return resp.status

        assert await post() == 200  # the key is in the collector's cache now
        assert await run("shops", "uninstall", domain, "--json") == 0
        done = json.loads(capsys.readouterr().out)
        assert done["keys_revoked"] == 2 and done["domain"] == domain
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (status := await post()) == 200:
            assert loop.time() - start < cache_s + 1.0, "revoked key still taken"
            await asyncio.sleep(0.05)
        assert status in (401, 403)
    row = await db.pool.fetchrow(
        "SELECT uninstalled_at, (SELECT count(*) FROM shop_write_keys k WHERE k.shop_id = s.id "
        "AND k.revoked_at IS NULL) AS live FROM shops s WHERE domain = $1",
        domain,
    )
    assert row["uninstalled_at"] is not None and row["live"] == 0
    assert row["uninstalled_at"].isoformat(timespec="seconds") == done["uninstalled_at"]
    # Again: the first uninstall's time stays (its retention counts from then), nothing revoked.
    assert await run("shops", "uninstall", domain, "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["uninstalled_at"] == done["uninstalled_at"] and again["keys_revoked"] == 0
    assert await run("shops", "show", domain, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["uninstalled_at"] == done["uninstalled_at"] and shown["live_keys"] == 0
    assert await run("shops", "uninstall", _domain()) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no shop" in err[0]
