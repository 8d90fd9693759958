"""Session fixtures: one real PostgreSQL and one real broker for the whole run.

PostgreSQL is the embedded one unless ``EVENTPIPE_TEST_POSTGRES_DSN`` points at
a server; then each session works in a fresh database created there and
dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.core.db import Database
from ingest.core.migrate import migrate
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials, ensure_shop
from ingest.core.topics import ensure_topics
from ingest.stack.broker import EmbeddedBroker
from ingest.stack.postgres import EmbeddedPostgres


def _with_database(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
async def server_dsn(state_dir: Path) -> AsyncIterator[str]:
    """DSN of a maintenance database on the server under test."""
    external = os.environ.get("EVENTPIPE_TEST_POSTGRES_DSN")
    if external:
        yield external
        return
    async with EmbeddedPostgres(
        state_dir, settings={"fsync": "off", "synchronous_commit": "off"}
    ) as pg:
        yield _with_database(pg.dsn, "postgres")


@pytest.fixture(scope="session")
async def scratch_database(server_dsn: str) -> AsyncIterator[object]:
    """A factory of fresh, empty databases on the server under test, dropped at the end."""
    created: list[str] = []

    async def make(prefix: str = "eventpipe_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return _with_database(server_dsn, name)

    yield make
    conn = await asyncpg.connect(server_dsn)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def pg_dsn(scratch_database: object) -> str:
    """A migrated database shared by the session."""
    dsn: str = await scratch_database()  # type: ignore[operator]
    await migrate(dsn)
    return dsn


@pytest.fixture(scope="session")
async def broker(state_dir: Path) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(state_dir / "broker") as b:
        yield b


@pytest.fixture
async def settings(pg_dsn: str, broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings with topics and consumer group of this test's own."""
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        state_dir=tmp_path,
        postgres_dsn=pg_dsn,
        kafka_bootstrap=broker.bootstrap,
        kafka_log_id=broker.log_id,
        topic_behavior=f"behavior.{tag}",
        topic_storefront=f"storefront.{tag}",
        consumer_group=f"loader-{tag}",
        collector_port=0,
        kafka_session_timeout_ms=6000,
        batch_max_age_ms=50,
    )
    await ensure_topics(
        broker.bootstrap, [s.topic_behavior, s.topic_storefront], partitions=s.topic_partitions
    )
    return s


@pytest.fixture(scope="session")
async def db(pg_dsn: str) -> AsyncIterator[Database]:
    async with Database(pg_dsn, max_size=4) as database:
        yield database


@pytest.fixture
async def shop(db: Database) -> ShopCredentials:
    """A shop of this test's own."""
    return await ensure_shop(db, f"shop-{uuid.uuid4().hex[:8]}.myshopify.com")


@pytest.fixture
async def collector(settings: Settings) -> AsyncIterator[str]:
    """A collector served in-process on a free port; yields its base URL."""
    from ingest.collector.server import serving

    async with (
        Database(settings.dsn) as database,
        serving(settings, database, key_cache_s=0.5) as (server, _),
    ):
        yield server.url


async def wait_for(predicate: object, timeout: float = 20.0, interval: float = 0.1) -> None:
    """Poll the async ``predicate`` until it returns truthy, or fail after ``timeout``."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def raw_request(
    base_url: str,
    method: str,
    target: str,
    headers: list[tuple[str, bytes]],
    body: bytes = b"",
) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 exchange written as raw bytes over a socket.

    Header values go on the wire exactly as given, in any bytes (HTTP clients
    refuse or re-encode non-ASCII ones), so tests can send what a hostile or
    broken client would.
    """
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode()
        for name, value in headers:
            head += name.encode() + b": " + value + b"\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=15)
    finally:
        writer.close()
    if not answer:  # the server closed the connection without an answer
        return 0, b""
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload


CHROMIUM = Path("/usr/bin/chromium")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _install_chromium() -> str | None:
    """Install Debian's chromium if it is missing; the reason it can't be, or None."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install chromium"
    for command, timeout in (
        (["apt-get", "update", "-q"], 90),
        (["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], 180),
    ):
        try:
            subprocess.run(
                command, env=APT_ENV, check=True, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.CalledProcessError as exc:
            return f"{' '.join(command)} failed: {(exc.stderr or exc.stdout).strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)} failed: {exc}"
    return None if CHROMIUM.exists() else f"{CHROMIUM} still missing after apt-get install"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium, driven by Playwright's async API.

    Chromium is Debian's ``chromium`` package at ``/usr/bin/chromium`` with
    Playwright for Python's bundled driver (no ``playwright install``: browsers
    are never downloaded). When it is missing this installs it, as root, with
    ``apt-get install chromium`` (CI runs as root, so ``make test`` does this on a
    fresh machine), and skips with the reason only when that is impossible. Tests
    take a fresh ``browser.new_context()`` each.
    """
    playwright_api = pytest.importorskip("playwright.async_api")
    reason = await asyncio.to_thread(_install_chromium)
    if reason is not None:
        pytest.skip(f"chromium could not be installed: {reason}")
    async with playwright_api.async_playwright() as pw:
        # launch() gives each browser a fresh temporary user-data dir.
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()
